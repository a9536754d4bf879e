"""The process group is freed by ``destroy_process_group`` even when the first optimizer of the
process comes after the group (issue: a rank aborting at exit with "terminate called without an
active exception"). torch.optim's first optimizer imports torch._dynamo, which imports
torch.distributed.nn.functional, whose defaults ``group=group.WORLD`` then hold the live group;
``compressor.mfac.group_defaults.bind_group_defaults`` imports that module while no group exists.

Each case runs in a fresh interpreter: in this one the module may already be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not Path("/proc/self/task").exists(),
    reason="needs torch.distributed and /proc",
)

CASE = """
import sys, tempfile
import torch, torch.distributed as dist
{before}

def group_threads():  # as compressor.mfac.group_defaults.group_threads, without importing compressor
    from pathlib import Path
    names = [(t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()]
    return [n for n in names if n.startswith(("pt_gloo", "gloo_"))]

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
{after}
t = torch.ones(3)
dist.all_reduce(t)
alive = group_threads()
dist.destroy_process_group()
print(len(alive), len(group_threads()))
"""


def _threads(before: str, after: str) -> tuple[int, int]:
    """(gloo threads while the group lives, gloo threads after destroy_process_group) in a fresh process."""
    code = CASE.format(before=textwrap.dedent(before), after=textwrap.dedent(after))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    alive, left = map(int, done.stdout.split()[-2:])
    return alive, left


SGD_AFTER_THE_GROUP = "opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)"
SHARDED_MFAC = (
    "from compressor.mfac import MFAC\nopt = MFAC([torch.zeros(5, requires_grad=True)], shard=True)"
)


def test_without_the_binding_torch_keeps_the_group_alive():
    """The cause, shown: a plain script (nothing of ours imported first) leaks the group."""
    alive, left = _threads("", SGD_AFTER_THE_GROUP)
    assert alive >= 2
    if left == 0:
        pytest.skip("this torch no longer pins the group in torch.distributed.nn.functional's defaults")
    assert left == alive


@pytest.mark.parametrize(
    "before, after",
    [
        ("import compressor.mfac", SGD_AFTER_THE_GROUP),  # the import binds (compressor.mfac.sharded)
        (
            "import compressor.mfac",
            SHARDED_MFAC,
        ),
        (
            "from compressor.mfac.group_defaults import bind_group_defaults\nbind_group_defaults()",
            "import torch._dynamo",
        ),
        (  # the group and torch's hold on it come first: the sharded window releases the hold
            "",
            SGD_AFTER_THE_GROUP + "\n" + SHARDED_MFAC,
        ),
        (
            "",
            SGD_AFTER_THE_GROUP
            + "\nfrom compressor.mfac.group_defaults import bind_group_defaults\nbind_group_defaults()"
            # the released default (None) still means the default group at call time
            + "\nimport torch.distributed.nn.functional as F"
            + "\nassert F.all_reduce(torch.ones(2)).tolist() == [1, 1]",
        ),
    ],
    ids=["optimizer", "sharded-mfac", "dynamo", "group-first-sharded-mfac", "group-first-bind"],
)
def test_with_the_binding_destroy_frees_the_group_and_its_threads(before, after):
    alive, left = _threads(before, after)
    assert alive >= 2 and left == 0


def test_group_threads_names_the_gloo_threads(tmp_path):
    import torch.distributed as dist

    from compressor.mfac.group_defaults import group_threads

    if dist.is_initialized():
        pytest.skip("a group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
        assert len(group_threads()) >= 2
    finally:
        dist.destroy_process_group()
    assert group_threads() == []


def test_ranks_leaving_work_in_flight_exit_cleanly_with_compressor_imported():
    """The abort itself, amplified (tests/soak/exit_abort.py): two gloo ranks leave 200 async
    all_reduces in flight at exit. Without the binding, about half such rounds end with a rank
    killed by "terminate called without an active exception"; with ``compressor.mfac`` imported
    first, none may (two rounds here; the soak runs more)."""
    import importlib.util

    path = Path(__file__).parent / "soak" / "exit_abort.py"
    spec = importlib.util.spec_from_file_location("exit_abort", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    for _ in range(2):
        code, output = soak.run_round("compressor", works=200)
        assert not soak.aborted(output), output[-2000:]
        assert code == 0, output[-2000:]
