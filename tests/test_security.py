"""Security properties of the package, as tests.

- No code path in ``asyncrl/`` unpickles: every ``torch.load`` passes ``weights_only=True``;
  ``pickle`` and friends (cPickle, dill, cloudpickle, joblib, marshal, shelve) are not
  imported; ``numpy.load`` never gets ``allow_pickle=True``; HF models load with
  ``use_safetensors=True`` and never with ``trust_remote_code=True``; no ``eval`` / ``exec``,
  ``yaml.load`` or ``shell=True``. The scanner below is checked against bad snippets too.
- Deliberate exception, by torch's design: a DCP train state's ``.metadata`` file is read with
  ``pickle.load`` inside ``torch.distributed.checkpoint`` (its own format). Train states are
  therefore trusted input: asyncrl loads only those under the run's own ``log_path`` and the
  one a user names in ``init_from_checkpoint``. Sampler snapshots and served weights are
  safetensors only (``check_model_dir`` refuses pickled ``*.bin`` weights,
  tests/test_bad_input.py::test_base_model_dir_missing_files[pickle-only]).
- The vLLM server binds a loopback host unless ``allow_remote=True`` (its dev-mode endpoints
  are unauthenticated). Loopback literals, 0.0.0.0 and 10.1.2.3 are covered in
  tests/test_deployment.py (test_loopback_hosts_are_accepted, test_config_errors_name_the_field,
  test_remote_host_needs_allow_remote); the default and further non-loopback spellings here.
- The hotload control path requires the bearer token when one is set (constant-time compare):
  tests/test_deployment.py::test_check_token and test_worker_rejects_before_touching_the_engine
  (missing and wrong token rejected before the engine is touched); the manager generates a
  random token per deployment when none is configured (deployment.py create_or_get); against
  real vLLM: tests/test_deployment_integration.py::test_wrong_token_is_rejected.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import asyncrl
from asyncrl.errors import ConfigError
from asyncrl.sync.deployment import DeploymentConfig, is_loopback

PACKAGE = Path(asyncrl.__file__).parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal",
                  "shelve"}


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for the expression ``torch.load`` ('' if not a plain dotted name)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value
        for kw in call.keywords
    )


def _call_problem(call: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(call.func)
    head, _, rest = name.partition(".")
    full = f"{aliases.get(head, head)}{'.' + rest if rest else ''}"
    if full == "torch.load" and not _kw_is(call, "weights_only", True):
        return "torch.load without weights_only=True"
    if full in ("numpy.load", "np.load") and _kw_is(call, "allow_pickle", True):
        return "numpy.load with allow_pickle=True"
    if full == "yaml.load":
        return "yaml.load (use yaml.safe_load)"
    if full in ("eval", "exec"):
        return f"builtin {full}()"
    if _kw_is(call, "trust_remote_code", True):
        return "trust_remote_code=True"
    if _kw_is(call, "shell", True):
        return "shell=True"
    owner = full.rpartition(".")[0].rpartition(".")[2]
    loads_model = owner.startswith("AutoModel") or owner.endswith(("ForCausalLM", "Model"))
    if (full.endswith(".from_pretrained") and loads_model
            and not _kw_is(call, "use_safetensors", True)):
        return f"{owner}.from_pretrained without use_safetensors=True"
    return None


def scan(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe-deserialisation / code-execution pattern in ``source``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> dotted module/function it stands for
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                aliases[a.asname or top] = a.name if a.asname else top
                if a.name.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{filename}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                problems.append(f"{filename}:{node.lineno}: imports from {node.module}")
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (problem := _call_problem(node, aliases)):
            problems.append(f"{filename}:{node.lineno}: {problem}")
    return problems


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("import torch\ntorch.load('x.pt')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x.pt', weights_only=False)", "torch.load without weights_only"),
        ("from torch import load\nload('x.pt')", "torch.load without weights_only=True"),
        ("import torch as T\nT.load('x.pt', map_location='cpu')", "torch.load without"),
        ("import pickle", "imports pickle"),
        ("from pickle import loads", "imports from pickle"),
        ("import cloudpickle as cp", "imports cloudpickle"),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", "allow_pickle=True"),
        ("import yaml\nyaml.load(open('c.yaml'))", "yaml.load"),
        ("eval(user_text)", "builtin eval()"),
        ("from transformers import AutoModelForCausalLM as M\nM.from_pretrained('d')",
         "AutoModelForCausalLM.from_pretrained without use_safetensors=True"),
        ("from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained('d', "
         "trust_remote_code=True)", "trust_remote_code=True"),
        ("import subprocess\nsubprocess.run(cmd, shell=True)", "shell=True"),
    ],
)
def test_scanner_catches_unsafe_code(source: str, problem: str) -> None:
    found = scan(source)
    assert any(problem in p for p in found), found


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load('x.pt', weights_only=True)",
        "from transformers import AutoModelForCausalLM\n"
        "AutoModelForCausalLM.from_pretrained('d', use_safetensors=True)",
        "from transformers import AutoTokenizer, AutoConfig\nAutoConfig.from_pretrained('d')\n"
        "AutoTokenizer.from_pretrained('d')",
        "import safetensors.torch\nsafetensors.torch.load_file('m.safetensors')",
        "model.eval()",
    ],
)
def test_scanner_accepts_safe_code(source: str) -> None:
    assert scan(source) == []


def test_package_never_unpickles_or_executes_untrusted_input() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in scan(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert problems == []


# --------------------------------------------------------------------------- deployment host


def _config(tmp_path: Path, **overrides: object) -> DeploymentConfig:
    return DeploymentConfig(model_dir=tmp_path / "m", snapshot_root=tmp_path / "s", **overrides)


def test_deployment_binds_loopback_by_default(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert is_loopback(config.host) and config.allow_remote is False


@pytest.mark.parametrize(
    "host", ["::", "[::]", "192.168.1.10", "example.com", "localhost.example.com",
             "127.0.0.1.nip.io", "0", ""],
)
def test_non_loopback_host_needs_explicit_opt_in(tmp_path: Path, host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(
        ConfigError, match=rf"host {re.escape(repr(host))} is not a loopback address.*allow_remote"
    ):
        _config(tmp_path, host=host)
    if host:
        assert _config(tmp_path, host=host, allow_remote=True).host == host
