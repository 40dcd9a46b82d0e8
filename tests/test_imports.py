"""The house's import rules: every module imports alone (no cycles), and imports run one way —
train.py/analyze.py -> analyses (jobs -> methods) -> encoders, datamodules; encoders and datamodules never
import analyses, nor each other."""
import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("encoders", "datamodules", "analyses")


def project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names + ["train", "analyze"]


def imported(module: str) -> set[str]:
    """Every module name a project module imports, at any depth of its code (static ``import``s only)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return out


IMPORT_EACH_ALONE = """
import importlib, json, sys
failures = []
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in {roots}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failures.append(f"{{name}}: {{type(err).__name__}}: {{err}}")
print(json.dumps(failures))
"""


def test_every_module_imports_alone():
    """Each project module is imported first, with no other project module loaded (in a process of its
    own, so this test's reloading cannot touch the other tests' modules): a cycle between modules fails
    here, as an ImportError on a partly initialised module."""
    mods = project_modules()
    assert len(mods) > 40
    code = IMPORT_EACH_ALONE.format(roots=repr(set(PACKAGES) | {"train", "analyze"}))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(mods)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
                                            "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, failures


@pytest.mark.parametrize("package, forbidden", [
    ("encoders", ("analyses", "datamodules")),
    ("datamodules", ("analyses", "encoders")),
    ("analyses.methods", ("analyses.jobs",)),
])
def test_imports_run_one_way(package, forbidden):
    offenders = {}
    for name in project_modules():
        if name == package or name.startswith(package + "."):
            bad = sorted(m for m in imported(name) if m.split(".")[0] in forbidden or m.startswith(forbidden))
            if bad:
                offenders[name] = bad
    assert not offenders, offenders


def test_no_analysis_reads_a_datasets_files_itself():
    """Analyses ask the run for its stimuli and ground truth (RunDir -> the run's datamodule class)."""
    for name in project_modules():
        if name.startswith("analyses"):
            names = imported(name)
            assert not any(m.startswith(("datamodules.nsd_files", "datamodules.nod_files", "datamodules.video_files",
                                         "datamodules.synthetic")) for m in names), (name, sorted(names))
