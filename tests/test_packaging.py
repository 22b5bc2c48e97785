"""Packaging checks that need no GPU and no Docker engine.

* The Dockerfile agrees with setup.py: same megatron-core pin, this checkout installed (not a
  package of the same name from an index), an NGC PyTorch base, no ENTRYPOINT, every console
  script of setup.py smoke-tested in the image. Each rule has a negative control that feeds the
  checker a modified Dockerfile / setup.py.
* .dockerignore keeps everything the image needs; the CI workflow has the three stages.
* Nothing on the CPU import path imports Transformer Engine or apex (a meta-path finder hides
  them in a subprocess and records who asked).
* tools/benchmark_pref.py runs end to end on CPU (tiny preset) with TE/apex hidden.

Module-level imports are the standard library and pytest only: CI imports this module to run
the CPU suite with the GPU stack hidden (``run_pytest_without_gpu_stack``).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "megatron_pref")
NGC_PYTORCH = re.compile(r"^nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$")
GPU_STACK = ("transformer_engine", "apex")

# Installed first in a Python process: hides Transformer Engine and apex (as on a machine
# without them) and records every attempt to import them with the file that asked.
BLOCKER_SOURCE = textwrap.dedent(r'''
    import atexit as _atexit, importlib.abc as _abc, json as _json, os as _os, sys as _sys
    _BLOCKED = ("transformer_engine", "apex")
    GPU_STACK_ATTEMPTS = []

    def _importer():
        f = _sys._getframe(2)
        while f is not None and (f.f_code.co_filename.startswith("<frozen")
                                 or _os.sep + "importlib" + _os.sep in f.f_code.co_filename):
            f = f.f_back
        return f.f_code.co_filename if f is not None else "?"

    class _HideGpuStack(_abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                GPU_STACK_ATTEMPTS.append([name, _importer()])
                raise ModuleNotFoundError(f"No module named {name!r} (hidden: CPU path)", name=name)
            return None

    for _m in [m for m in _sys.modules if m.split(".")[0] in _BLOCKED]:
        del _sys.modules[_m]
    _sys.meta_path.insert(0, _HideGpuStack())
    if _os.environ.get("GPU_STACK_REPORT"):
        _atexit.register(lambda: open(_os.environ["GPU_STACK_REPORT"], "w").write(_json.dumps(GPU_STACK_ATTEMPTS)))
''')


# After the blocker, a sitecustomize on PYTHONPATH runs the one it shadows (if any).
CHAIN_SITECUSTOMIZE = textwrap.dedent(r'''
    import importlib.machinery as _machinery, importlib.util as _util
    _here = _os.path.dirname(_os.path.abspath(__file__))
    _spec = _machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in _sys.path if _os.path.abspath(p or ".") != _here])
    if _spec is not None:
        _spec.loader.exec_module(_util.module_from_spec(_spec))
''')


def hide_gpu_stack_in_subprocesses(directory: str) -> None:
    """Hide TE and apex in every Python process started from now on (CLI tests, torchrun ranks,
    tools): a ``sitecustomize.py`` in ``directory``, put first on PYTHONPATH, runs the blocker."""
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write(BLOCKER_SOURCE + CHAIN_SITECUSTOMIZE)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (directory, os.environ.get("PYTHONPATH")) if p)


def run_pytest_without_gpu_stack(args) -> int:
    """Run pytest with TE and apex hidden, in this process and in the processes the tests start
    (the CI's CPU tests in the NGC image, whose TE cannot load without a GPU)."""
    import tempfile

    hide_gpu_stack_in_subprocesses(tempfile.mkdtemp(prefix="hide-gpu-stack-"))
    exec(compile(BLOCKER_SOURCE, "<hide-gpu-stack>", "exec"), {"__name__": "hide_gpu_stack"})
    import pytest as _pytest

    return _pytest.main(list(args))


def test_gpu_stack_hidden_in_subprocesses_too(tmp_path):
    """A process started after hide_gpu_stack_in_subprocesses sees TE and apex hidden; one
    started without it (control) does not get the blocker's message."""
    probe = "import transformer_engine"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert "hidden: CPU path" not in plain.stderr
    driver = textwrap.dedent(f'''
        import subprocess, sys
        sys.path.insert(0, {ROOT!r})
        from tests.test_packaging import hide_gpu_stack_in_subprocesses
        hide_gpu_stack_in_subprocesses({str(tmp_path)!r})
        child = subprocess.run([sys.executable, "-c", {probe!r}], capture_output=True, text=True)
        sys.stdout.write(child.stderr)
        clean = subprocess.run([sys.executable, "-c", "print('fine')"], capture_output=True, text=True)
        sys.stdout.write("[clean] " + clean.stdout + clean.stderr)
    ''')
    hidden = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env)
    assert "hidden: CPU path" in hidden.stdout, hidden.stdout + hidden.stderr
    # A process that imports neither starts cleanly (no "Error in sitecustomize").
    assert hidden.stdout.split("[clean] ", 1)[1] == "fine\n", hidden.stdout


# ----------------------------------------------------------------------------------------------
# Dockerfile and setup.py parsing
# ----------------------------------------------------------------------------------------------
def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            instr, _, rest = current.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
        current = ""
    if current.strip():
        instr, _, rest = current.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def _substitute(value: str, args: dict) -> str:
    def repl(m):
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, value)


REQUIREMENT_PIN = re.compile(r"(?<![\w.\-])([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?==([0-9][\w.+\-!]*)")


def parse_dockerfile(text: str) -> dict:
    args, runs, copies = {}, [], []
    base = workdir = None
    entrypoint = False
    for instr, rest in dockerfile_instructions(text):
        if instr == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif instr == "FROM":
            base = _substitute(rest.split()[0], args)
        elif instr == "WORKDIR":
            workdir = _substitute(rest, args)
        elif instr == "RUN":
            runs.append(_substitute(rest, args))
        elif instr == "COPY":
            copies.append(_substitute(rest, args).split())
        elif instr == "ENTRYPOINT":
            entrypoint = True
    pins, local_installs, named_installs = {}, [], []
    for run in runs:
        for segment in re.split(r"&&|;|\|\|", run):
            if "pip install" not in segment:
                continue
            for name, version in REQUIREMENT_PIN.findall(segment):
                pins[normalize(name)] = version
            words = [w.strip("'\"") for w in segment.split()]
            after = words[words.index("install") + 1:] if "install" in words else []
            targets = [w for w in after if not w.startswith("-")]
            for t in targets:
                requirement = re.split(r"[\[=<>!~ ]", t, maxsplit=1)[0]
                if t == "." or t.startswith(".[") or t.startswith("./") or (workdir and t == workdir):
                    local_installs.append(segment.strip())
                elif requirement:
                    named_installs.append(normalize(requirement))
    # "COPY . ." (into WORKDIR) or "COPY . <WORKDIR>": the whole checkout lands where pip installs from.
    copies_checkout = any(len(c) >= 2 and c[-2] == "." and c[-1] in (".", "./", workdir) for c in copies
                          if not any(x.startswith("--from") for x in c))
    return dict(args=args, base=base, workdir=workdir, runs=runs, pins=pins, entrypoint=entrypoint,
                local_installs=local_installs, named_installs=named_installs, copies_checkout=copies_checkout)


def parse_setup(text: str) -> dict:
    """The literal keyword arguments of the setup() call in a setup.py."""
    tree = ast.parse(text)
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", None)) == "setup"), None)
    if call is None:
        raise ValueError("no setup() call in setup.py")
    kwargs = {}
    for kw in call.keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            pass  # not a literal (e.g. find_packages())
    pins = {}
    for req in kwargs.get("install_requires", []):
        m = REQUIREMENT_PIN.search(req.split(";")[0].replace(" ", ""))
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    entry_points = kwargs.get("entry_points", {}) or {}
    scripts = entry_points.get("console_scripts", []) if isinstance(entry_points, dict) else []
    console = {s.split("=")[0].strip(): s.split("=", 1)[1].strip() for s in scripts}
    return dict(name=kwargs.get("name"), pins=pins, console_scripts=console, kwargs=kwargs)


def check_docker_matches_setup(dockerfile_text: str, setup_text: str) -> list[str]:
    """Every disagreement between the Dockerfile and setup.py, as one line each (empty: agree)."""
    d, s = parse_dockerfile(dockerfile_text), parse_setup(setup_text)
    problems = []
    if not d["base"] or not NGC_PYTORCH.match(d["base"]):
        problems.append(f"base image {d['base']!r} is not an NGC PyTorch image (nvcr.io/nvidia/pytorch:YY.MM-py3)")
    core = "megatron-core"
    if core not in s["pins"]:
        problems.append("setup.py does not pin megatron-core with ==")
    if core not in d["pins"]:
        problems.append("the Dockerfile does not pip install megatron-core==<version>")
    for name, version in d["pins"].items():
        if name in s["pins"] and s["pins"][name] != version:
            problems.append(f"{name}: Dockerfile pins {version}, setup.py pins {s['pins'][name]}")
    if not d["copies_checkout"]:
        problems.append("the Dockerfile does not COPY the checkout (COPY . .) into its WORKDIR")
    if not d["local_installs"]:
        problems.append("the Dockerfile does not pip install this checkout (pip install [-e] .)")
    own = normalize(s["name"] or "")
    if own in d["named_installs"]:
        problems.append(f"the Dockerfile installs {own} by name (from an index), not this checkout")
    if d["entrypoint"]:
        problems.append("the Dockerfile sets an ENTRYPOINT (commands are passed to docker run)")
    for script in s["console_scripts"]:
        if not any(re.search(rf"(^|[\s;&|]){re.escape(script)}\s+--help", run) for run in d["runs"]):
            problems.append(f"console script {script!r} of setup.py is not smoke-tested in the Dockerfile "
                            f"(RUN {script} --help)")
    return problems


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


# ----------------------------------------------------------------------------------------------
# Dockerfile <-> setup.py
# ----------------------------------------------------------------------------------------------
def test_dockerfile_agrees_with_setup():
    assert check_docker_matches_setup(read("Dockerfile"), read("setup.py")) == []


def test_dockerfile_pin_is_the_installed_megatron_core():
    from importlib.metadata import version

    assert parse_dockerfile(read("Dockerfile"))["pins"]["megatron-core"] == version("megatron-core")


def test_checker_catches_a_different_dockerfile_pin():
    docker = read("Dockerfile")
    assert "MEGATRON_CORE_VERSION=0.16.1" in docker
    problems = check_docker_matches_setup(docker.replace("MEGATRON_CORE_VERSION=0.16.1",
                                                         "MEGATRON_CORE_VERSION=0.16.0"), read("setup.py"))
    assert any("megatron-core" in p and "0.16.0" in p for p in problems), problems


def test_checker_catches_a_different_setup_pin():
    setup = read("setup.py").replace('"megatron-core==0.16.1"', '"megatron-core==0.17.0"')
    problems = check_docker_matches_setup(read("Dockerfile"), setup)
    assert any("0.17.0" in p for p in problems), problems


def test_checker_catches_a_literal_pin_without_the_arg():
    docker = read("Dockerfile").replace('"megatron-core==${MEGATRON_CORE_VERSION}"', '"megatron-core==0.15.0"')
    assert any("0.15.0" in p for p in check_docker_matches_setup(docker, read("setup.py")))


def test_checker_catches_an_install_from_an_index():
    docker = read("Dockerfile").replace('-e ".[logging,test]"', "megatron-pref").replace("--no-deps -e .", "--no-deps megatron-pref")
    problems = check_docker_matches_setup(docker, read("setup.py"))
    assert any("by name" in p for p in problems), problems
    assert any("pip install this checkout" in p for p in problems), problems


def test_checker_catches_a_missing_copy():
    docker = read("Dockerfile").replace("COPY . .", "COPY megatron_pref megatron_pref")
    assert any("COPY the checkout" in p for p in check_docker_matches_setup(docker, read("setup.py")))


def test_checker_catches_an_entrypoint_and_another_base():
    docker = read("Dockerfile") + '\nENTRYPOINT ["python"]\n'
    docker = re.sub(r"ARG BASE_IMAGE=\S+", "ARG BASE_IMAGE=python:3.11-slim", docker)
    problems = check_docker_matches_setup(docker, read("setup.py"))
    assert any("ENTRYPOINT" in p for p in problems) and any("NGC" in p for p in problems), problems


def test_checker_catches_an_untested_console_script():
    setup = read("setup.py").replace(
        "extras_require=", 'entry_points={"console_scripts": ["pref-train = megatron_pref.cli:main"]},\n    extras_require=')
    assert parse_setup(setup)["console_scripts"] == {"pref-train": "megatron_pref.cli:main"}
    problems = check_docker_matches_setup(read("Dockerfile"), setup)
    assert any("pref-train" in p for p in problems), problems
    docker = read("Dockerfile") + "\nRUN pref-train --help\n"
    assert check_docker_matches_setup(docker, setup) == []


def test_console_scripts_resolve():
    """Every console script of setup.py names an importable module and attribute."""
    import importlib

    for script, target in parse_setup(read("setup.py"))["console_scripts"].items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr.split()[0])), script


def test_dockerfile_base_satisfies_setup_python():
    """NGC 25.x images ship Python 3.12; setup.py must accept it."""
    required = parse_setup(read("setup.py"))["kwargs"].get("python_requires", "")
    m = re.match(r">=\s*3\.(\d+)", required)
    assert m and int(m.group(1)) <= 12, required


# ----------------------------------------------------------------------------------------------
# .dockerignore and the CI workflow
# ----------------------------------------------------------------------------------------------
def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per pattern, in order; Docker's rules: the last matching pattern wins."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((negated, re.compile(regex + "$")))
    return out


def dockerignore_excludes(patterns, path: str) -> bool:
    """Whether a context-relative path is left out (a pattern matching a parent excludes it)."""
    parts = path.split("/")
    excluded = False
    for negated, regex in patterns:
        if any(regex.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def files_the_image_needs() -> list[str]:
    needed = [p for p in ("setup.py", "Dockerfile", "pretrain_pref.py") if os.path.exists(os.path.join(ROOT, p))]
    for top in ("megatron_pref", "tools", "tests", "examples", "docs"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if not f.endswith(".pyc"):
                    needed.append(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/"))
    return needed


def test_dockerignore_keeps_what_the_image_needs():
    patterns = dockerignore_patterns(read(".dockerignore"))
    needed = files_the_image_needs()
    assert "setup.py" in needed and any(p.startswith("megatron_pref/") for p in needed)
    assert [p for p in needed if dockerignore_excludes(patterns, p)] == []
    for local_state in (".git/config", ".whl/setup.sh", "runs/x.json", "megatron_pref/__pycache__/a.pyc"):
        assert dockerignore_excludes(patterns, local_state), local_state


def test_dockerignore_check_catches_an_excluded_package():
    patterns = dockerignore_patterns(read(".dockerignore") + "\nmegatron_pref\n")
    assert dockerignore_excludes(patterns, "megatron_pref/model.py")
    patterns = dockerignore_patterns("**/*.py\n!setup.py\n")
    assert dockerignore_excludes(patterns, "megatron_pref/model.py")
    assert not dockerignore_excludes(patterns, "setup.py")


def test_ci_workflow_builds_and_runs_cpu_then_gpu_tests():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(read(".github/workflows/docker.yml"))
    jobs = workflow["jobs"]

    def commands(job):
        return "\n".join(step.get("run", "") for step in job["steps"])

    cpu = [j for j in jobs.values() if "docker build" in commands(j) and "not gpu" in commands(j)]
    assert cpu, "no job builds the image and runs the CPU tests in it"
    gpu = [j for j in jobs.values() if isinstance(j.get("runs-on"), list)
           and {"self-hosted", "gpu"} <= set(j["runs-on"])]
    assert gpu and re.search(r"pytest\s+-m\s+gpu", commands(gpu[0])), "no self-hosted GPU job runs pytest -m gpu"
    assert "--gpus all" in commands(gpu[0])
    # The CPU job runs the suite through the hook defined here.
    assert "run_pytest_without_gpu_stack" in commands(cpu[0])


# ----------------------------------------------------------------------------------------------
# The CPU import path never touches Transformer Engine or apex
# ----------------------------------------------------------------------------------------------
IMPORT_ALL = textwrap.dedent('''
    import importlib, json, pkgutil, sys
    name, path = sys.argv[1], sys.argv[2]
    sys.path.insert(0, path)
    package = importlib.import_module(name)
    modules = [name] + [m.name for m in pkgutil.walk_packages(package.__path__, name + ".")]
    errors = {}
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as exc:
            errors[m] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"modules": modules, "errors": errors, "attempts": GPU_STACK_ATTEMPTS,
                      "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("transformer_engine", "apex"))}))
''')


def import_all_with_gpu_stack_hidden(package: str, parent_dir: str) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", BLOCKER_SOURCE + IMPORT_ALL, package, parent_dir],
                          capture_output=True, text=True, env=env, timeout=240, cwd=parent_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def attempts_from(report: dict, directory: str) -> list:
    directory = os.path.realpath(directory) + os.sep
    return [a for a in report["attempts"] if os.path.realpath(a[1]).startswith(directory)]


def test_cpu_import_path_never_imports_te_or_apex():
    report = import_all_with_gpu_stack_hidden("megatron_pref", ROOT)
    assert len(report["modules"]) > 5, report["modules"]
    assert report["errors"] == {}, "modules that fail to import without TE/apex"
    assert attempts_from(report, PACKAGE_DIR) == [], "megatron_pref imports TE/apex on the CPU path"
    assert report["loaded"] == []


def test_import_check_catches_a_guarded_te_import(tmp_path):
    """Negative control: a module that tries TE (even inside try/except) is reported."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fast.py").write_text("try:\n    import transformer_engine.pytorch\nexcept ImportError:\n    pass\n")
    (pkg / "fused.py").write_text("try:\n    from apex.optimizers import FusedAdam\nexcept ImportError:\n    FusedAdam = None\n")
    report = import_all_with_gpu_stack_hidden("fakepkg", str(tmp_path))
    assert report["errors"] == {}
    names = sorted(a[0] for a in attempts_from(report, str(pkg)))
    assert names == ["apex", "transformer_engine"], report


# ----------------------------------------------------------------------------------------------
# tools/benchmark_pref.py on CPU
# ----------------------------------------------------------------------------------------------
def load_benchmark():
    import importlib.util

    name = "benchmark_pref"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "benchmark_pref.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses need the module registered while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_benchmark_flop_params_match_known_model_sizes():
    bench = load_benchmark()
    # Llama-3.2-1B (tied embeddings): 1,235,814,400 parameters; N counts the LM head once.
    assert bench.flop_params(bench.PRESETS["1b"], 128256) == 1_235_814_400
    # Llama-3-8B: 8,030,261,248 parameters, 525,336,576 of them the input embedding.
    full_8b = dict(bench.PRESETS["8b-slice"], num_layers=32)
    assert bench.flop_params(full_8b, 128256) == 8_030_261_248 - 525_336_576


@pytest.mark.parametrize("preset, tokens_per_s, tflops", [("1b", 46.2e3, 348), ("8b-slice", 35.1e3, 482)])
def test_benchmark_flop_formula_reproduces_the_shared_probe(preset, tokens_per_s, tflops):
    """shared/device/README.md: 16 sequences, 8416 real tokens per step, the same formula."""
    bench = load_benchmark()
    shape = bench.PRESETS[preset]
    sum_sq = 16 * (8416 / 16) ** 2  # lower bound of sum(len^2); the attention term is ~1% here
    per_step = bench.step_flops(shape, 128256, 8416, sum_sq)
    measured = per_step * tokens_per_s / 8416 / 1e12
    assert measured == pytest.approx(tflops, rel=0.02)


def test_benchmark_packs_respect_the_fp8_multiple():
    import numpy as np

    bench = load_benchmark()
    shape = bench.PRESETS["tiny"]
    args = (shape["vocab_size"], shape["prompt_median"], shape["response_median"], shape["max_prompt"], shape["max_len"])
    a = bench.sample_pairs(np.random.default_rng(3), 5, *args)
    b = bench.sample_pairs(np.random.default_rng(3), 5, *args)
    assert [p.chosen_sequence.tolist() for p in a] == [p.chosen_sequence.tolist() for p in b], "seeded"
    unpadded = [bench.make_pack(bench.sample_pairs(np.random.default_rng(s), 5, *args), "packed", 1).pack_length
                for s in range(8)]
    assert any(n % 16 for n in unpadded), "control: without padding some packs are not multiples of 16"
    for layout in ("packed", "padded"):
        pack = bench.make_pack(a, layout, 16)
        assert pack.pack_length % 16 == 0
        # loss tokens per sequence = response lengths, in either layout
        per_seq = [float(pack.loss_mask[s:e].sum()) for s, e in zip(pack.cu_seqlens[:-1], pack.cu_seqlens[1:])]
        assert per_seq == [float(n) for p in a for n in (len(p.chosen_ids), len(p.rejected_ids))]
    padded = bench.make_pack(a, "padded", 16)
    slot = max(len(s) for s in bench.sequences(a))
    assert padded.cu_seqlens.tolist() == [k * slot for k in range(2 * len(a) + 1)]


@pytest.mark.slow
def test_benchmark_tiny_runs_on_cpu_without_the_gpu_stack(tmp_path):
    """One command -> one run -> a table and a JSON file; TE/apex hidden; well under 30 s."""
    out, report = tmp_path / "bench.json", tmp_path / "gpu_stack.json"
    runner = BLOCKER_SOURCE + textwrap.dedent('''
        import runpy, sys
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    ''')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GPU_STACK_REPORT=str(report))
    cmd = [sys.executable, "-c", runner, os.path.join(ROOT, "tools", "benchmark_pref.py"), "--preset", "tiny",
           "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tok/s real" in proc.stdout and "packed/hf" in proc.stdout  # the table

    result = json.loads(out.read_text())
    meta = result["meta"]
    assert meta["preset"] == "tiny" and meta["device"] == "cpu" and "6 * (params" in meta["flop_formula"]
    rows = {r["name"]: r for r in result["configs"]}
    assert set(rows) == {"packed", "packed-fp8", "padded", "hf"}
    assert rows["packed-fp8"]["status"] == "skipped"
    for name in ("packed", "padded", "hf"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] is None
        assert len(r["step_times_s"]) == 2 and all(map(lambda v: v == v, r["losses"]))
        assert r["model_params"] == rows["packed"]["model_params"], "identical shapes"
    # The same pairs everywhere: real tokens agree; padding is what differs.
    assert rows["packed"]["real_tokens_per_step"] == rows["hf"]["real_tokens_per_step"]
    assert rows["packed"]["padding_fraction"] < rows["padded"]["padding_fraction"]
    assert rows["padded"]["padding_fraction"] == pytest.approx(rows["hf"]["padding_fraction"], abs=0.05)
    # Same seed, same pairs: packed and padded start from the same weights and loss.
    assert result["summary"]["checks"]["packed_padded_step0_loss_abs_diff"] < 1e-5
    assert result["logprob_stage"]["status"] == "skipped"  # memory is measured on CUDA only
    attempts = json.loads(report.read_text())
    ours = [a for a in attempts if os.path.realpath(a[1]).startswith((os.path.realpath(PACKAGE_DIR) + os.sep,
                                                                       os.path.join(os.path.realpath(ROOT), "tools")))]
    assert ours == [], "the benchmark's CPU path imports TE/apex"


# ----------------------------------------------------------------------------------------------
# examples/: the launch scripts use flags the entry points have, and layouts that fit the models
# ----------------------------------------------------------------------------------------------
EXAMPLES = os.path.join(ROOT, "examples")
EXAMPLE_ENV = dict(DRY_RUN="1", LOAD="/ckpt/init", DATA_PREFIX="/data/train", TOKENIZER="/models/tok",
                   HF_DIR="/models/Meta-Llama-3-8B-Instruct", DATA="/data/prefs.jsonl", WORK="/runs/w",
                   FP8="1", VALID_DATA_PREFIX="/data/valid", REF_LOAD="/ckpt/ref", WANDB_PROJECT="pref",
                   VERIFY="1", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0")
# model: (attention heads, query groups)
EXAMPLE_MODELS = {"llama3_8b": (32, 8), "qwen2.5_7b": (28, 4)}


def example_scripts(suffix: str) -> list[str]:
    return sorted(f for f in os.listdir(EXAMPLES) if f.endswith(suffix))


def dry_run(script: str, **extra) -> list[list[str]]:
    import shlex

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(EXAMPLE_ENV, **extra)
    proc = subprocess.run(["bash", os.path.join(EXAMPLES, script)], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip() and not line.startswith("done:")]


def help_flags(argv: list[str]) -> set[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable] + argv + ["--help"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", proc.stdout))


@functools.cache
def pretrain_flags() -> frozenset:
    if os.path.exists(os.path.join(ROOT, "pretrain_pref.py")):
        return frozenset(help_flags(["pretrain_pref.py"]))
    arguments = pytest.importorskip("megatron_pref.arguments", reason="no pretrain_pref.py and no parser yet")
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", arguments.build_parser().format_help()))


def flags_of(args: list[str]) -> set[str]:
    return {a for a in args if re.fullmatch(r"--[a-z0-9][a-z0-9-]*", a)}


def value_of(args: list[str], flag: str):
    return args[args.index(flag) + 1] if flag in args else None


def test_example_scripts_are_valid_bash():
    scripts = example_scripts(".sh") + example_scripts(".sbatch")
    assert {"llama3_8b_dpo.sh", "llama3_8b_spo.sh", "qwen2.5_7b_dpo.sh", "convert_train_convert_back.sh",
            "llama3_8b_dpo.sbatch", "llama3_8b_spo.sbatch"} <= set(scripts)
    for script in scripts:
        proc = subprocess.run(["bash", "-n", os.path.join(EXAMPLES, script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_sbatch_scripts_launch_their_torchrun_script_on_two_nodes():
    for script in example_scripts(".sbatch"):
        text = read(os.path.join("examples", script))
        assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text, script
        assert "#SBATCH --ntasks-per-node=1" in text, script  # one torchrun per node
        target = script.replace(".sbatch", ".sh")
        assert re.search(rf"srun .*bash examples/{re.escape(target)}", text), script
        assert os.path.exists(os.path.join(EXAMPLES, target)), target


@pytest.mark.parametrize("script, model, loss", [("llama3_8b_dpo.sh", "llama3_8b", "dpo"),
                                                 ("llama3_8b_spo.sh", "llama3_8b", "spo"),
                                                 ("qwen2.5_7b_dpo.sh", "qwen2.5_7b", "dpo")])
def test_example_training_commands(script, model, loss):
    (command,) = dry_run(script)
    assert command[0] == "torchrun" and "pretrain_pref.py" in command
    launcher, args = command[:command.index("pretrain_pref.py")], command[command.index("pretrain_pref.py") + 1:]
    assert value_of(launcher, "--nnodes") == "2" and value_of(launcher, "--node-rank") == "1"
    assert value_of(launcher, "--nproc-per-node") == "8" and value_of(launcher, "--master-addr") == "node0"
    unknown = flags_of(args) - pretrain_flags()
    assert not unknown, f"{script} passes flags pretrain_pref.py does not have: {sorted(unknown)}"
    assert value_of(args, "--loss") == loss
    tp, pp = int(value_of(args, "--tensor-model-parallel-size")), int(value_of(args, "--pipeline-model-parallel-size"))
    heads, groups = EXAMPLE_MODELS[model]
    assert heads % tp == 0 and groups % tp == 0 and (2 * 8) % (tp * pp) == 0
    assert {"--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--bf16"} <= flags_of(args)
    assert value_of(args, "--transformer-impl") == "transformer_engine"
    assert value_of(args, "--fp8-format") == "hybrid" and value_of(args, "--fp8-recipe") == "delayed"
    assert value_of(args, "--micro-batch-size") == "1"
    assert value_of(args, "--load") == "/ckpt/init" and value_of(args, "--ref-load") == "/ckpt/ref"
    # Without the optional inputs the optional flags disappear.
    (plain,) = dry_run(script, FP8="0", VALID_DATA_PREFIX="", REF_LOAD="", WANDB_PROJECT="")
    assert not {"--fp8-format", "--valid-data-path", "--ref-load", "--wandb-project"} & flags_of(plain)


def test_example_convert_train_convert_back():
    commands = dry_run("convert_train_convert_back.sh")
    tools = [c for c in commands if c[0] == "python"]
    scripts = [c[1] for c in tools]
    assert scripts == ["tools/convert_hf_to_megatron.py", "tools/verify_conversion.py",
                       "tools/preprocess_pref_data.py", "tools/convert_megatron_to_hf.py"]
    for command in tools:
        unknown = flags_of(command[2:]) - help_flags([command[1]])
        assert not unknown, f"{command[1]} has no {sorted(unknown)}"
    convert, _, preprocess, back = tools
    (train,) = [c for c in commands if c[0] == "torchrun"]
    train_args = train[train.index("pretrain_pref.py") + 1:]
    # The chain: converted checkpoint -> training --load; data prefix; training --save -> back-conversion --load.
    assert value_of(train_args, "--load") == value_of(convert, "--save")
    assert value_of(train_args, "--data-path") == value_of(preprocess, "--output-prefix")
    assert value_of(back, "--load") == value_of(train_args, "--save")
    assert value_of(train_args, "--tensor-model-parallel-size") == value_of(convert, "--target-tensor-parallel-size")
    for flag in ("--seq-length", "--max-prompt-length"):
        assert value_of(train_args, flag) == value_of(preprocess, flag), flag
    assert value_of(train_args, "--tokenizer-model") == value_of(preprocess, "--tokenizer-model")


# ----------------------------------------------------------------------------------------------
# README.md and docs/: every documented command passes only flags its program has
# ----------------------------------------------------------------------------------------------
DOCUMENTS = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                             if f.endswith(".md")]


def documented_commands(text: str) -> list[list[str]]:
    """The argument lists after ``pretrain_pref.py`` / ``tools/*.py`` in the fenced shell blocks."""
    import shlex

    blocks, language, lines = [], None, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if language is None:
                language, lines = line.strip()[3:].strip(), []
            else:
                if language in ("", "bash", "sh", "console"):
                    blocks.append("\n".join(lines))
                language = None
        elif language is not None:
            lines.append(line)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True  # words, with && | ; ( ) as tokens of their own
            words, parts = [], []
            for token in list(lexer) + [";"]:
                if re.fullmatch(r"[|&;()<>]+", token):
                    parts.append(words)
                    words = []
                else:
                    words.append(token)
            for words in parts:
                for i, word in enumerate(words):
                    if word == "pretrain_pref.py" or re.fullmatch(r"tools/\w+\.py", word):
                        commands.append(words[i:])
                        break
    return commands


def test_documented_command_parser_finds_commands_and_their_flags():
    text = "```bash\nA=1 torchrun --nproc-per-node 2 pretrain_pref.py --loss spo \\\n  --bf16 # note\n" \
           "python tools/convert_hf_to_megatron.py --hf-dir x && python tools/x.py --y | tail\n```\n"
    assert documented_commands(text) == [["pretrain_pref.py", "--loss", "spo", "--bf16"],
                                         ["tools/convert_hf_to_megatron.py", "--hf-dir", "x"],
                                         ["tools/x.py", "--y"]]


@pytest.mark.slow
def test_documented_commands_use_existing_flags():
    by_program: dict = {}
    for doc in DOCUMENTS:
        for command in documented_commands(read(doc)):
            by_program.setdefault(command[0], set()).update(flags_of(command[1:]))
    assert "pretrain_pref.py" in by_program and "tools/benchmark_pref.py" in by_program
    problems = {}
    for program, flags in sorted(by_program.items()):
        assert os.path.exists(os.path.join(ROOT, program)), f"documented program {program} does not exist"
        known = pretrain_flags() if program == "pretrain_pref.py" else help_flags([program])
        if flags - known:
            problems[program] = sorted(flags - known)
    assert not problems, f"documented flags the programs do not have: {problems}"
    # Control: a misspelt flag is caught by the same comparison.
    assert "--tensor-parallel-size" not in pretrain_flags()
