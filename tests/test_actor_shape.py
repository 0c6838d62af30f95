"""How many CPUs each generation actor reserves, from the cluster's node shapes (pure functions, no Ray)."""

from __future__ import annotations

import pytest

from jobs.generate import READ_TASK_CPUS, WRITE_TASK_CPUS, cpu_actor_shape, gpu_actor_shape


@pytest.mark.parametrize(
    "nodes, expected",
    [
        ([(16.0, 1.0)], (4.0, 4)),  # one H200 box: a few CPUs for encoding, the rest for reads and writes
        ([(32.0, 8.0)], (3.0, 3)),  # 4 CPUs per GPU, less the reads' and writes' share
        ([(2.0, 1.0)], (1.0, 1)),  # never less than one
        ([(96.0, 8.0), (16.0, 8.0), (8.0, 0.0)], (1.0, 1)),  # the GPU node with the fewest CPUs per GPU sets it
    ],
)
def test_gpu_actor_reserves_a_few_cpus_to_encode_its_batches(nodes, expected):
    assert gpu_actor_shape(nodes) == expected


def test_cpu_actors_leave_one_read_and_one_write_room_on_every_node(monkeypatch):
    monkeypatch.delenv("INVARDIFF_TORCH_THREADS", raising=False)
    nodes = [(2.0, 0.0)]
    assert cpu_actor_shape(1, nodes) == (pytest.approx(2.0 - READ_TASK_CPUS - WRITE_TASK_CPUS), 2)
    cpus, threads = cpu_actor_shape(2, nodes)
    assert 2 * cpus + READ_TASK_CPUS + WRITE_TASK_CPUS == pytest.approx(2.0) and threads == 1
