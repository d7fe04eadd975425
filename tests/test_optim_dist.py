"""Meta-training under torchrun: perturbation pairs split over 2 CPU processes give one process's result."""
import subprocess
import sys

import torch

SCRIPT = """
import sys, torch
import torch.distributed as dist
from unf.optim.meta import MetaConfig, init_distributed, meta_train
torch.set_num_threads(1)
init_distributed("cpu")
cfg = MetaConfig(steps=4, pairs=4, unroll=3, min_horizon=3, max_horizon=6, rule=dict(hidden=4, depth=1, hyper_hidden=4))
rule, history = meta_train(cfg, out=sys.argv[1])
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save(torch.nn.utils.parameters_to_vector(rule.parameters()).detach(), sys.argv[1] + "/theta.pt")
"""


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "meta.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], check=True, capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(two)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(one / "theta.pt", weights_only=True)
    b = torch.load(two / "theta.pt", weights_only=True)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    assert (two / "rule.safetensors").is_file()
