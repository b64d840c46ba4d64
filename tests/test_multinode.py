"""Training on several nodes (`cosa train --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`).

Two nodes are two `cosa train` processes on 127.0.0.1, each a torch elastic agent (c10d rendezvous)
with one gloo rank. They must end with the weights of one node's two ranks (`--nproc 2`), bit for
bit: the ranks see the same shards and sum the same two gradients (a + b == b + a), whichever
node holds rank 0. Every process runs one OpenMP thread, as thread counts may change CPU kernels'
summation order. Bad multi-node options exit 2 with one line, before any rank starts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import tiny_config
from typer.testing import CliRunner

from cli import app
from cosa.checkpoint import Checkpoint, load_checkpoint
from cosa.config import dump_yaml
from cosa.data import write_synthetic_dataset
from cosa.errors import ConfigError
from cosa.train.distributed import free_port
from cosa.train.launch import launch
from cosa.train.rendezvous import node_group

ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
NODE_SECONDS = 300  # a generous bound for one node's whole run on a loaded 2-core machine

# A node whose rank stops for good right after the checkpoint of iteration BLOCK_AFTER is saved,
# and says so in FLAG: the test then SIGKILLs that node (agent and rank) at a known iteration.
# Spawned ranks import this file as __mp_main__, so the patch applies in them too.
BLOCKING_NODE = """
import os, threading
from pathlib import Path

from cosa.train.trainer import Trainer

save = Trainer._save


def save_then_block(self, path):
    save(self, path)
    if self.state.iteration == int(os.environ["BLOCK_AFTER"]) and path.name == "last.pt":
        Path(os.environ["FLAG"]).touch()
        threading.Event().wait()  # until killed


Trainer._save = save_then_block

if __name__ == "__main__":
    from cosa.app.cli import app

    app()
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, 8, 2, 2, seed=1)
    return root


@pytest.fixture(scope="module")
def config_file(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny configuration as a `--config` file (no evaluation before the end)."""
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    dump_yaml(tiny_config(tiny_data, **{"train.eval_every": 100, "train.vis_images": 0}), path)
    return path


@pytest.fixture(scope="module")
def one_node(config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The reference: one node, two ranks (`--nproc 2`), the same global batch."""
    from cosa.config import resolve

    out = tmp_path_factory.mktemp("one_node") / "run"
    with pytest.MonkeyPatch.context() as env:
        for key, value in ONE_THREAD.items():
            env.setenv(key, value)  # the spawned ranks read it when torch starts
        launch(resolve("demo", config_file, []), out, device="cpu", nproc=2, progress=False)
    return load_checkpoint(out / "checkpoints" / "last.pt")


def _start_node(
    rank: int, port: int, out: Path, *extra: str, script: Path | None = None, **env: str
) -> subprocess.Popen[str]:
    """`cosa train` as node `rank` of two, in its own process group (the agent and its rank)."""
    entry = [str(script)] if script else ["-m", "cosa.app.cli"]
    args = ["train", "--out", str(out), "--device", "cpu", "--nnodes", "2"]
    args += ["--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"]
    return subprocess.Popen(
        [sys.executable, *entry, *args, "--rdzv-timeout", "120", *extra],
        env={**os.environ, **ONE_THREAD, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _run_two_nodes(out: Path, *extra: str) -> list[tuple[int, str, str]]:
    """Both nodes to the end: (exit code, stdout, stderr) of node 0, then node 1."""
    port = free_port()
    nodes = [_start_node(rank, port, out, *extra) for rank in (0, 1)]
    ends = [node.communicate(timeout=NODE_SECONDS) for node in nodes]
    return [(node.returncode, *end) for node, end in zip(nodes, ends, strict=True)]


def _assert_same_run(reference: Checkpoint, ckpt: Checkpoint) -> None:
    assert ckpt.iteration == reference.iteration == 4
    for name in ("online", "teacher"):
        a, b = getattr(reference, name), getattr(ckpt, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert reference.thresholds is not None and ckpt.thresholds is not None
    for pair in ("main", "aux"):
        for key in ("queue", "low", "high"):
            assert torch.equal(reference.thresholds[pair][key], ckpt.thresholds[pair][key]), key


@pytest.mark.slow  # five processes import torch on 2 shared cores: 20-40 s with the reference
def test_two_nodes_reach_the_weights_of_one_node_with_two_ranks(
    one_node: Checkpoint, config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    ends = _run_two_nodes(out, "--config", str(config_file))
    for code, _, stderr in ends:
        assert code == 0, stderr
    # Rank 0 (on whichever node c10d put it) prints the summary; the other node says so.
    reports = [stdout for _, stdout, _ in ends if "run folder:" in stdout]
    assert len(reports) == 1 and f"run folder: {out}" in reports[0]
    assert sum("global rank 0 ran on another node" in stderr for _, _, stderr in ends) == 1
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    _assert_same_run(one_node, ckpt)
    assert (out / "train_result.json").is_file()


@pytest.mark.slow  # two two-node starts and a kill: 25-45 s on 2 shared cores
def test_a_killed_node_stops_the_other_and_resume_on_both_continues(
    one_node: Checkpoint, config_file: Path, tmp_path: Path
) -> None:
    out, flag, script = tmp_path / "run", tmp_path / "blocked", tmp_path / "blocking_node.py"
    script.write_text(BLOCKING_NODE)
    port = free_port()
    config = ["--config", str(config_file)]
    victim = _start_node(0, port, out, *config, script=script, BLOCK_AFTER="2", FLAG=str(flag))
    survivor = _start_node(1, port, out, *config)
    deadline = time.monotonic() + NODE_SECONDS
    while not flag.exists():  # node 0's rank saved iteration 2 and stopped
        if victim.poll() is not None or survivor.poll() is not None or time.monotonic() > deadline:
            for node in (victim, survivor):
                os.killpg(node.pid, signal.SIGKILL)
            pytest.fail(f"no node blocked: {victim.communicate()} {survivor.communicate()}")
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the agent, its rank, and the rendezvous store it hosts
    victim.communicate()
    killed_at = time.monotonic()
    _, stderr = survivor.communicate(timeout=120)
    stopped_after = time.monotonic() - killed_at
    assert survivor.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    # Its rank saw the peer gone, or its agent saw the store gone (node 0 hosted it), first.
    assert lines[0].startswith("error: training stopped: "), lines[0]
    assert "run every node again with --resume" in lines[0]
    assert stopped_after < 60, stopped_after
    assert load_checkpoint(out / "checkpoints" / "last.pt").iteration == 2

    ends = _run_two_nodes(out, "--resume")
    for code, _, stderr in ends:
        assert code == 0, stderr
    _assert_same_run(one_node, load_checkpoint(out / "checkpoints" / "last.pt"))
    steps = (out / "metrics.jsonl").read_text().count('"kind": "step"')
    assert steps == 4


# ------------------------------------------------------------------------------------ bad input


def _train(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "from 0 to 1"),
        (["--node-rank", "1"], "--node-rank 1 with --nnodes 1"),
        (["--nnodes", "0"], "--nnodes 0"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0:port"], "'node0:port': The port number"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0:0"], "port 0 cannot be reached"),
        (["--nnodes", "2", "--rdzv-endpoint", "n:1", "--rdzv-timeout", "0"], "--rdzv-timeout 0"),
    ],
)
def test_inconsistent_options_exit_2_with_one_line(
    tmp_path: Path, args: list[str], says: str
) -> None:
    code, output = _train(tmp_path, *args)
    assert code == 2 and says in output, output
    assert output.startswith("error:") and output.count("error:") == 1
    assert not (tmp_path / "run").exists()


def test_an_unreachable_endpoint_exits_2_after_the_timeout(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    code, output = _train(
        tmp_path,
        *["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{port}"],
        *["--rdzv-timeout", "1", "--device", "cpu"],
    )
    assert code == 2, output
    assert f"127.0.0.1:{port}: node rank 0 did not answer within 1 s" in output
    assert "Connection refused" in output and output.count("error:") == 1
    assert time.monotonic() - start < 10
    assert not (tmp_path / "run").exists()


def test_node_0_reports_a_taken_port_and_nodes_that_never_join(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = _train(
            tmp_path, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--device", "cpu"
        )
    assert code == 2 and f"port {port} is already in use on this node" in output, output
    code, output = _train(
        tmp_path,
        *["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"],
        *["--rdzv-timeout", "2", "--device", "cpu"],
    )
    assert code == 2 and "not all 2 nodes joined the rendezvous" in output, output
    assert output.count("error:") == 1 and "Traceback" not in output
    assert not (tmp_path / "run").exists()


def test_nnodes_under_torchrun_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    code, output = _train(tmp_path, "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400")
    assert code == 2 and "started by torchrun" in output, output


def test_node_group_endpoints() -> None:
    assert node_group(1, 0, None) is None  # this node alone: the one-node launcher
    one = node_group(1, 0, "node0:29400")  # a job script scaled down to one node runs as is
    assert one is not None and one.endpoint == "node0:29400" and one.hosts_store
    v6 = node_group(2, 1, "[::1]:1234", timeout_s=5)
    assert v6 is not None and (v6.host, v6.port, v6.endpoint) == ("::1", 1234, "[::1]:1234")
    assert not v6.hosts_store and v6.timeout_s == 5
    default = node_group(2, 1, "node0")
    assert default is not None and default.port == 29400  # torchrun's c10d port
    with pytest.raises(ConfigError, match="--node-rank -1"):
        node_group(2, -1, "node0:1")


def test_what_a_node_reports_when_its_ranks_stop(tmp_path: Path) -> None:
    """A rank's own error is raised as it was; anything else (a peer gone, a signal) becomes one
    DistributedError naming the rank, the gist of its error and how to continue."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from cosa.errors import CheckpointError, DistributedError
    from cosa.train.launch import _stopped

    killed = ChildFailedError("train", {3: ProcessFailure(1, 4242, -9, str(tmp_path / "none"))})
    lost = RuntimeError(
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Connection closed by peer "
        "[10.0.0.2]:24192. This is typically caused by a remote worker crashing.\nmore"
    )
    own = CheckpointError("--resume: no checkpoint at run/checkpoints/last.pt")
    assert _stopped(killed, [(0, lost), (1, own)], tmp_path) is own

    error = _stopped(killed, [(2, lost)], tmp_path)
    assert isinstance(error, DistributedError) and error.exit_code == 1
    assert str(error).startswith(
        "training stopped: rank 2 on this node raised RuntimeError: Connection closed by peer "
        "[10.0.0.2]:24192, as every rank does"
    )
    assert str(error).endswith("run every node again (no checkpoint was saved yet)")

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").touch()
    error = _stopped(killed, [], tmp_path)  # killed before it could report anything
    assert "rank 3 on this node was killed by SIGKILL, as every" in str(error)
    assert str(error).endswith(f"--resume to continue from {tmp_path}/checkpoints/last.pt")


def _doc_blocks(language: str) -> list[str]:
    """The fenced `language` blocks of docs/training.md's "Several nodes" section."""
    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    section = text.split("## Several nodes\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_slurm_script_and_the_pytorchjob_use_options_cosa_train_has(tmp_path: Path) -> None:
    """Not run (no SLURM, no cluster here): the script parses, the manifest is a PyTorchJob the
    operator fills in (a `pytorch` container, a `pytorchjob-port`), and every option they pass
    to `cosa train` exists."""
    import typer.main
    import yaml

    train = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    options = {o for param in train.params for o in param.opts if o.startswith("--")}

    (script,) = _doc_blocks("bash")
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
    commands = [line for line in script.splitlines() if not line.startswith("#")]
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", "\n".join(commands)))
    assert {"--nnodes", "--node-rank", "--rdzv-endpoint", "--resume"} <= used <= options

    (manifest,) = _doc_blocks("yaml")
    job = yaml.safe_load(manifest)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    for spec in replicas.values():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["ports"][0]["name"] == "pytorchjob-port"
        command = container["args"][0]
        assert '--node-rank "$RANK" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"' in command
        assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", command)) <= options
