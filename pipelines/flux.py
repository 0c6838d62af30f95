"""FLUX text-to-image generators.

`tiny_flux_pipeline` builds a randomly initialised, few-MB `FluxPipeline` fully offline, for tests.
`load_flux_pipeline` loads a real one from a diffusers-layout directory, local or behind an fsspec URI, or only its
transformer for benchmarking at full size without the ~10 GB of text encoders. `FluxGenerator` runs one batch of
`Request`s through either and reports what `jobs/` and the plan signature need.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import string
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipelines import fetch
from pipelines.base import GenerationResult, Request, to_uint8
from pipelines.fetch import PIPELINE_INDEX, local_model_dir

# What black-forest-labs/FLUX.1-dev ships in scheduler/scheduler_config.json. The shift grows with the image's
# token count (`use_dynamic_shifting`); the pipeline computes it per call.
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    base_shift=0.5,
    max_shift=1.15,
)

# The tiny pipeline: every width is a handful of channels, so a 32x32 image costs milliseconds per step on CPU.
TINY_JOINT_ATTENTION_DIM = 32  # T5 width, the text tokens the transformer attends to
TINY_POOLED_PROJECTION_DIM = 32  # CLIP width, the pooled vector that conditions the modulation
TINY_CLIP_MAX_LENGTH = 16
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 VAE latent channels packed in 2x2 patches
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TINY_JOINT_ATTENTION_DIM,
    pooled_projection_dim=TINY_POOLED_PROJECTION_DIM,
    guidance_embeds=True,  # like FLUX.1-dev: guidance is an input, not a second pass
    axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),  # two levels: latents are half the image size
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    # FLUX's VAE has no quant convs and both factors; the pipeline fails on a None shift_factor.
    scaling_factor=0.5,
    shift_factor=0.1,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# Letters and digits are enough for test prompts to tokenize to distinct ids; anything else becomes <unk>.
_TINY_VOCAB_CHARS = string.ascii_lowercase + string.digits


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised FLUX pipeline small enough for CPU tests; the same seed gives the same weights.

    Every component is built from a config or from code, so nothing is read from the network or the disk:
    2 dual-stream and 2 single-stream blocks 32 wide, a 2-layer CLIP and T5, a 2-level VAE (32x32 images are
    16x16 latents, 64 image tokens) and character-level tokenizers.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    clip_pieces = ["<|startoftext|>", "<|endoftext|>"]
    clip_pieces += list(_TINY_VOCAB_CHARS) + [c + "</w>" for c in _TINY_VOCAB_CHARS]  # BPE marks a word's last char
    tokenizer = CLIPTokenizer(
        vocab={piece: i for i, piece in enumerate(clip_pieces)}, merges=[], model_max_length=TINY_CLIP_MAX_LENGTH
    )
    # T5's Unigram vocabulary starts <pad>, </s>, <unk>; "▁" marks the start of a word. T5 does not lowercase.
    t5_chars = _TINY_VOCAB_CHARS + string.ascii_uppercase
    t5_pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    t5_pieces += [(c, -3.0) for c in t5_chars] + [("▁" + c, -3.5) for c in t5_chars]
    tokenizer_2 = T5Tokenizer(vocab=t5_pieces, extra_ids=0)

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_POOLED_PROJECTION_DIM,
                intermediate_size=37,
                projection_dim=TINY_POOLED_PROJECTION_DIM,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_CLIP_MAX_LENGTH,
                hidden_act="gelu",
                # The pooled output is read at the first EOS token, so the config must know the tokenizer's ids.
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=TINY_JOINT_ATTENTION_DIM,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",  # T5 v1.1, which FLUX uses
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
        vae = AutoencoderKL(**TINY_VAE_CONFIG)

    # Modules built from configs start in training mode; T5's dropout would make every call random.
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.register_to_config(_name_or_path=f"tiny-flux-seed{seed}")  # the default model_id of its generators
    # Built in float32 and cast, so the bfloat16 tiny model is the float32 one rounded. (Skipping the no-op cast
    # also skips diffusers 0.42's spurious "should be kept in float32: []" warning.)
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


def load_flux_pipeline(
    uri: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    *,
    transformer_only: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
):
    """A `FluxPipeline` from a diffusers-layout directory: a local path or any fsspec URI (see `local_model_dir`).

    With `transformer_only`, the text encoders are never loaded: the pipeline holds the transformer, the scheduler
    and the VAE when the directory has one, and `FluxGenerator` feeds it random prompt embeddings of the right shapes.
    This is for benchmarking a full-size transformer where the text encoders would not fit or do not matter.
    `uri` may then also be a bare transformer directory (`FluxTransformer2DModel.save_pretrained`), and if that
    holds a config but no weights, the transformer is randomly initialised from `seed` (on the CPU, so every device
    gets the same weights, and straight in `dtype`, so a 12B model never exists in float32).
    """
    from diffusers import FluxPipeline

    root = local_model_dir(uri, storage_options=storage_options, cache_dir=cache_dir)
    if (root / PIPELINE_INDEX).is_file():
        class_name = FluxPipeline.load_config(root).get("_class_name")
        if class_name != "FluxPipeline":
            raise ValueError(f"{uri} holds a {class_name}, not a FluxPipeline")
    elif not transformer_only:
        raise ValueError(f"{uri} holds a single model, not a pipeline; load it with transformer_only=True")

    if transformer_only:
        pipeline = _transformer_only_pipeline(root, dtype, seed)
    else:
        pipeline = FluxPipeline.from_pretrained(root, dtype=dtype, local_files_only=True)
    # Name the model by where it came from, not by the local cache directory it was read from.
    pipeline.register_to_config(_name_or_path=os.fspath(uri))
    pipeline.to(device)
    if torch.device(device).type == "cpu":
        _copy_into_aligned_memory(pipeline)
    return pipeline


def _copy_into_aligned_memory(pipeline) -> None:
    """Give every weight memory of its own.

    Weights loaded from safetensors stay views into the file's buffer, at offsets that are not 64-byte aligned.
    CPU kernels take another code path for unaligned data and round differently, so a loaded model would differ
    from the same weights in memory by an ulp here and there. Fresh tensors are aligned, and results are bitwise
    reproducible. (Moving to a GPU copies the weights anyway.)
    """
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                tensor.data = tensor.data.clone()


def _transformer_only_pipeline(root: Path, dtype: torch.dtype, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    is_pipeline = (root / PIPELINE_INDEX).is_file()
    transformer = _load_or_init_transformer(root / "transformer" if is_pipeline else root, dtype, seed)
    if is_pipeline and (root / "scheduler").is_dir():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    vae = None
    if is_pipeline and (root / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype, local_files_only=True)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def _load_or_init_transformer(directory: Path, dtype: torch.dtype, seed: int):
    from diffusers import FluxTransformer2DModel

    if not (directory / "config.json").is_file():
        raise ValueError(f"no FluxTransformer2DModel config in {directory}")
    config = FluxTransformer2DModel.load_config(directory)
    if config.get("_class_name") != "FluxTransformer2DModel":
        raise ValueError(f"{directory} holds a {config.get('_class_name')}, not a FluxTransformer2DModel")
    has_weights = any(p.suffix in (".safetensors", ".bin") for p in directory.iterdir())
    if has_weights:
        return FluxTransformer2DModel.from_pretrained(directory, dtype=dtype, local_files_only=True)
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            return FluxTransformer2DModel.from_config(config).eval()
        finally:
            torch.set_default_dtype(previous_dtype)


def flux_layer_counts(transformer) -> dict[str, int]:
    """Layers per module family, in the forward order of docs/contracts.md."""
    dual = len(transformer.transformer_blocks)
    single = len(transformer.single_transformer_blocks)
    return {
        "attn": dual,
        "context_attn": dual,
        "ff": dual,
        "context_ff": dual,
        "single_attn": single,
        "single_mlp": single,
    }


class FluxGenerator:
    """Runs batches of text prompts through a `FluxPipeline` (the `Generator` protocol of `pipelines/base.py`).

    Guidance: `guidance_scale` is FLUX-dev's distilled guidance, an input of the transformer (ignored by models
    without `guidance_embeds`, such as FLUX-schnell). `true_cfg_scale > 1` adds classic classifier-free guidance
    against `negative_prompt`, as separate cond and uncond transformer calls under the cache contexts "cond" and
    "uncond", which doubles the cost.

    A row's noise comes from its own CPU generator seeded with its `seed`, and prompts are padded to fixed lengths,
    so a row's image is the same (up to float rounding) whatever else is in its batch, on CPU or GPU.
    """

    architecture = "flux"

    def __init__(
        self,
        pipeline,
        num_inference_steps: int = 28,
        height: int = 1024,
        width: int = 1024,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        max_sequence_length: int = 512,
        model_id: str | None = None,
        device: str | torch.device | None = None,
        negative_prompt: str = "",
        model_fingerprint: str | None = None,
    ):
        patch = pipeline.vae_scale_factor * 2  # the VAE's downsampling times FLUX's 2x2 latent packing
        if height % patch or width % patch:
            # FluxPipeline would silently round the size down; the signature and the output rows would then lie.
            raise ValueError(f"height and width must be multiples of {patch}, got {height}x{width}")
        if device is not None:
            pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.device = torch.device(pipeline._execution_device)
        self.num_inference_steps = num_inference_steps
        self.height = height
        self.width = width
        self.guidance_scale = guidance_scale
        self.true_cfg_scale = true_cfg_scale
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        self.model_id = model_id or pipeline.config.get("_name_or_path") or "flux"
        self._model_fingerprint = model_fingerprint

    @property
    def guidance_mode(self) -> str:
        if self.true_cfg_scale > 1:
            return "cfg-separate"
        return "distilled" if self.transformer.config.guidance_embeds else "none"

    @property
    def model_fingerprint(self) -> str:
        # Hashing a full-size transformer reads every weight once; do it only when a signature is asked for.
        if self._model_fingerprint is None:
            self._model_fingerprint = fetch.model_fingerprint(self.transformer)
        return self._model_fingerprint

    def signature_fields(self) -> dict:
        """The fields of this generator's `PipelineSignature` (docs/contracts.md)."""
        mode = self.guidance_mode
        # The scale that shapes the output in each mode. With "cfg-separate" on a guidance-distilled model the
        # distilled `guidance_scale` matters too, and the signature has no field for it.
        scale = {"cfg-separate": self.true_cfg_scale, "distilled": self.guidance_scale, "none": 1.0}[mode]
        return {
            "architecture": self.architecture,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "scheduler": type(self.pipeline.scheduler).__name__,
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "guidance_mode": mode,
            "guidance_scale": float(scale),
            "dtype": str(self.transformer.dtype).removeprefix("torch."),
            "layers": flux_layer_counts(self.transformer),
        }

    def signature(self):
        from invardiff.plan import PipelineSignature

        return PipelineSignature(**self.signature_fields())

    @torch.no_grad()
    def generate(self, requests: Sequence[Request]) -> GenerationResult:
        if not requests:
            raise ValueError("generate() needs at least one request")
        missing = [r.id for r in requests if r.prompt is None]
        if missing:
            raise ValueError(f"FLUX is text-to-image; requests without a prompt: {missing}")
        batch_size = len(requests)
        start = time.perf_counter()

        prompt_embeds, pooled_prompt_embeds = self._encode([r.prompt for r in requests])
        guidance_kwargs = {}
        if self.true_cfg_scale > 1:
            # One negative prompt for every row: encode it once.
            negative_embeds, negative_pooled = self._encode([self.negative_prompt])
            guidance_kwargs = dict(
                true_cfg_scale=self.true_cfg_scale,
                negative_prompt_embeds=negative_embeds.expand(batch_size, -1, -1),
                negative_pooled_prompt_embeds=negative_pooled.expand(batch_size, -1),
            )
        # CPU generators: the same seed gives the same noise whatever the device.
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]

        # With prompts already encoded and decoding left to us, the pipeline call is the denoising loop.
        self._synchronize()
        denoise_start = time.perf_counter()
        (packed_latents,) = self.pipeline(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            height=self.height,
            width=self.width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            max_sequence_length=self.max_sequence_length,
            output_type="latent",
            return_dict=False,
            **guidance_kwargs,
        )
        self._synchronize()
        denoise_seconds = time.perf_counter() - denoise_start

        latents = self.pipeline._unpack_latents(packed_latents, self.height, self.width, self.pipeline.vae_scale_factor)
        images = self._decode(latents)
        return GenerationResult(
            images=images,
            final=latents.float().cpu(),
            seconds=time.perf_counter() - start,
            denoise_seconds=denoise_seconds,
        )

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 token embeddings (B, max_sequence_length, joint_attention_dim) and pooled CLIP vectors (B, pooled_dim)."""
        if self.pipeline.text_encoder is not None:
            prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            return prompt_embeds, pooled
        # Transformer-only: random embeddings seeded by the prompt text, so equal prompts still condition equally.
        config = self.transformer.config
        embeds, pooled = [], []
        for prompt in prompts:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
            generator = torch.Generator("cpu").manual_seed(seed)
            embeds.append(torch.randn(1, self.max_sequence_length, config.joint_attention_dim, generator=generator))
            pooled.append(torch.randn(1, config.pooled_projection_dim, generator=generator))
        to_model = dict(device=self.device, dtype=self.transformer.dtype)
        return torch.cat(embeds).to(**to_model), torch.cat(pooled).to(**to_model)

    def _decode(self, latents: torch.Tensor):
        vae = self.pipeline.vae
        if vae is None:
            # A transformer-only pipeline without a VAE: a preview of three latent channels at latent resolution,
            # for eyeballing only. Fidelity metrics use `GenerationResult.final` either way.
            return to_uint8(latents[:, :3])
        # One row at a time: peak memory stays that of one image (a 1024x1024 decode is several GB).
        images = []
        for row in latents.split(1):
            row = row / vae.config.scaling_factor + vae.config.shift_factor
            images.append(to_uint8(vae.decode(row.to(vae.dtype), return_dict=False)[0]))
        return np.concatenate(images)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
