"""Several nodes under torchrun: a 2-node x 1-process job (two agents on this machine, c10d
rendezvous, gloo on CPU) trains exactly the weights of a 1-node x 2-process job. Both use the
Partial FC head (class shards, sampled negatives); the 1-node job is also interrupted and resumed on
the way."""
import os
import socket
import subprocess
import sys

import torch

from conftest import ROOT
from test_train_arcface import ENV, TINY, make_folder

SCRIPT = os.path.join(ROOT, "train_arcface.py")


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_train_the_same_weights_as_one_node_with_two_processes(tmp_path):
    data = make_folder(tmp_path / "data", [f"id{i:02d}" for i in range(16)], per=3)
    args = ["--data", data, *TINY, "--epochs", "2", "--partial-fc", "--sample-rate", "0.5"]
    port, two_nodes = free_port(), tmp_path / "two_nodes"
    agents = [subprocess.Popen(torchrun("--nnodes", 2, "--node-rank", rank, "--nproc-per-node", 1,
                                        "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                        f"localhost:{port}", "--rdzv-id", "scale-test",
                                        "--rdzv-conf", f"is_host={int(rank == 0)}", SCRIPT, *args,
                                        "--out", two_nodes),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               cwd=ROOT)
              for rank in (0, 1)]  # both agents on localhost: node 0 hosts the rendezvous store
    outputs = [agent.communicate(timeout=120) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err
    assert "2 process(es)" in "".join(out for out, _ in outputs)

    one_node = tmp_path / "one_node"
    for extra in (["--stop-after-epochs", 1], []):  # interrupted after epoch 1, then resumed
        r = subprocess.run(torchrun("--standalone", "--nproc-per-node", 2, SCRIPT, *args, "--out",
                                    one_node, *extra),
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout

    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (two_nodes, one_node))
    # every class's row
    assert a["step"] == b["step"] == 12 and a["model"]["head.weight"].shape == (16, 16)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    momentum = [ck["optimizer"]["state"] for ck in (a, b)]
    assert momentum[0].keys() == momentum[1].keys()
    for k in momentum[0]:
        assert torch.equal(momentum[0][k]["momentum_buffer"], momentum[1][k]["momentum_buffer"]), k
    a, b = (torch.load(run / "model.pt", weights_only=True)["state_dict"]
            for run in (two_nodes, one_node))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
