"""The conda envs (envs/*.yaml, for --software-deployment-method conda) run their rules.

Each rule's env must hold every distribution its `sae-audit <command>` imports. What a
command imports is read off the package's source (ImportScan): the imports the command's
code runs, the lazy ones inside the functions it reaches included, which no single real
invocation shows (compress imports llm-compressor only for shipped variants). A
distribution counts as listed when the env lists it or something that requires it.
The lists themselves are pyproject.toml's dependencies, pinned; envs/analysis.yaml
leaves out the model-only ones, so that it truly lacks torch (tests/test_imports.py
checks that the table stages import none of it).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sae_audit"
TEST_CONFIG = ROOT / "tests" / "configs" / "test.yaml"

# pyproject dependencies that only model-side rules import: envs/analysis.yaml omits them.
MODEL_ONLY = {
    "torch",
    "sae-lens",
    "snakemake",
    "llmcompressor",
    "compressed-tensors",
    "gguf",
    "datasets",
}
# The env of the rules that load a model, an SAE or a checkpoint, and of the others.
MODEL_ENV, TABLE_ENV = "torch.yaml", "analysis.yaml"
# torch is a floor, not a pin (the GPU build a cluster needs is not the CPU build tested).
FLOORS = {"torch"}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def env_spec(env: str) -> dict:
    return yaml.safe_load((ROOT / "envs" / env).read_text())


def env_requirements(env: str) -> dict[str, Requirement]:
    """The pip requirements an env file lists, by canonical name."""
    deps = env_spec(env)["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    return {canonical(r.name): r for r in map(Requirement, pip)}


# ---------------------------------------------------------------- env files vs pyproject
def test_every_env_file_is_checked():
    assert sorted(p.name for p in (ROOT / "envs").glob("*.yaml")) == [TABLE_ENV, MODEL_ENV]


@pytest.mark.parametrize("env", [MODEL_ENV, TABLE_ENV])
def test_env_pins_pyprojects_dependencies(env):
    wanted = {canonical(Requirement(r).name): Requirement(r) for r in project()["dependencies"]}
    assert set(wanted) >= MODEL_ONLY
    if env == TABLE_ENV:
        wanted = {name: r for name, r in wanted.items() if name not in MODEL_ONLY}
    listed = env_requirements(env)
    assert set(listed) == set(wanted), "the env must list pyproject's dependencies"
    for name, requirement in listed.items():
        if name in FLOORS:
            assert requirement.specifier == wanted[name].specifier, name
            continue
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{name}: pin the version the tests run on"
        assert wanted[name].specifier.contains(pin.version), f"{name}: outside pyproject's range"


@pytest.mark.parametrize("env", [MODEL_ENV, TABLE_ENV])
def test_env_python_meets_requires_python(env):
    deps = env_spec(env)["dependencies"]
    (python,) = [d for d in deps if isinstance(d, str) and d.startswith("python=")]
    assert SpecifierSet(project()["requires-python"]).contains(python.removeprefix("python="))


def test_analysis_env_lacks_the_model_only_dependencies():
    assert not set(env_requirements(TABLE_ENV)) & MODEL_ONLY


# ---------------------------------------------------------------- the package in the env
def post_deploy(env: str) -> Path:
    return ROOT / "envs" / env.replace(".yaml", ".post-deploy.sh")


@pytest.mark.parametrize("env", [MODEL_ENV, TABLE_ENV])
def test_every_env_has_the_post_deploy_script(env):
    script = post_deploy(env)
    assert script.resolve() == post_deploy(MODEL_ENV).resolve(), "one script for both envs"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


def run_post_deploy(script: Path, env_dir: Path, **environ: str) -> subprocess.CompletedProcess:
    """`script` as Snakemake runs it: `bash <path>` in the activated env, from elsewhere.

    The env sees this interpreter's packages, pip and setuptools among them, so the
    editable install builds offline (PIP_NO_BUILD_ISOLATION=0 turns build isolation off).
    """
    venv.create(env_dir, system_site_packages=True)
    bin_dir = env_dir / "bin"
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "VIRTUAL_ENV": str(env_dir), "PIP_NO_BUILD_ISOLATION": "0"}
    env.pop("SAE_AUDIT_SOURCE", None)
    return subprocess.run(
        ["bash", str(script)],
        env={**env, **environ},
        cwd=env_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )


def installed_in(env_dir: Path) -> Path | None:
    """Where the env's own site-packages has sae-audit's metadata, if it does."""
    found = list((env_dir / "lib").glob("python3*/site-packages/sae_audit-*.dist-info"))
    return found[0] if found else None


def test_post_deploy_installs_this_repository_into_the_env(tmp_path):
    # The path Snakemake hands over: the env file's directory as the rule names it.
    script = ROOT / "workflow" / "rules" / ".." / ".." / "envs" / post_deploy(TABLE_ENV).name
    done = run_post_deploy(script, tmp_path / "env")
    assert done.returncode == 0, done.stdout + done.stderr
    assert installed_in(tmp_path / "env") is not None
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "env" / "bin" / "sae-audit")
    where = subprocess.run(
        [tmp_path / "env" / "bin" / "python", "-c", "import sae_audit; print(sae_audit.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert Path(where.stdout.strip()) == PACKAGE / "__init__.py", "an editable install"


def test_post_deploy_from_a_copy_asks_for_the_source_or_uses_it(tmp_path):
    # A workflow used from a remote source: Snakemake runs a temporary copy of the script.
    copy = tmp_path / "copy.post-deploy.sh"
    shutil.copy(post_deploy(MODEL_ENV), copy)
    refused = run_post_deploy(copy, tmp_path / "env")
    assert refused.returncode == 1
    assert "set SAE_AUDIT_SOURCE" in refused.stderr
    assert installed_in(tmp_path / "env") is None
    given = run_post_deploy(copy, tmp_path / "env", SAE_AUDIT_SOURCE=str(ROOT))
    assert given.returncode == 0, given.stdout + given.stderr
    assert installed_in(tmp_path / "env") is not None


# ---------------------------------------------------------------- what each command imports
Unit = tuple[str, str | None]  # (module, a top-level def of it, or None: the module's own code)


class ImportScan:
    """The package's modules, parsed: what running some of its functions may import.

    Reaching a function reaches its module (importing runs the module's top level, and its
    package's), and every function, class or module-level value of the package its code
    names; the import statements of all code reached are what it imports. A module's top
    level reaches only what it calls (a table of functions it merely stores is reached
    through the name of the table). Annotations and `if TYPE_CHECKING:` blocks do not run.
    """

    def __init__(self, package_dir: Path = PACKAGE):
        self.trees: dict[str, ast.Module] = {}
        self.packages: set[str] = set()
        for path in sorted(package_dir.rglob("*.py")):
            parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
                self.packages.add(".".join(parts))
            self.trees[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
        # Per module, its top-level names: the def, class or assignments that make each.
        self.defs: dict[str, dict[str, list[ast.stmt]]] = {}
        for module, tree in self.trees.items():
            names: dict[str, list[ast.stmt]] = {}
            for node in tree.body:
                for name in _defined(node):
                    names.setdefault(name, []).append(node)
            self.defs[module] = names
        # Every name an import binds anywhere in a module (type-checking and lazy ones too).
        self.bindings = {
            module: {
                name: unit
                for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom)
                for name, unit in self._binds(module, node)
            }
            for module, tree in self.trees.items()
        }
        self.reached: set[str] = set()

    def imports(self, entries: Iterable[Unit]) -> set[str]:
        """The top-level names of the modules outside the package that `entries` may import
        (and, in self.reached, the package's modules they import)."""
        outside: set[str] = set()
        seen: set[Unit] = set()
        todo = list(entries)
        while todo:
            unit = todo.pop()
            if unit in seen:
                continue
            seen.add(unit)
            module, name = unit
            if module not in self.trees:
                outside.add(module.split(".")[0])
                continue
            parent = module.rpartition(".")[0]
            todo += [(module, None)] if name is not None else [(parent, None)] if parent else []
            if name is None:
                nodes: list[ast.AST] = [self.trees[module]]
            elif name in self.defs[module]:
                nodes = list(self.defs[module][name])
            else:
                if name in self.bindings[module]:  # a lazily resolved name (sae_audit.fixture)
                    todo.append(self.bindings[module][name])
                continue
            refs = _References(top_level=name is None)
            for node in nodes:
                refs.visit(node)
            for statement in refs.imports:
                todo += [unit for _, unit in self._binds(module, statement)]
            for word in refs.names:
                if word in self.defs[module]:
                    todo.append((module, word))
                elif (bound := self.bindings[module].get(word)) and bound[0] in self.trees:
                    todo.append(bound)
            for word, attr in refs.attributes:
                bound = self.bindings[module].get(word)
                if bound and bound[0] in self.trees and bound[1] is None:
                    todo.append(self._member(bound[0], attr))
        self.reached = {module for module, _ in seen if module in self.trees}
        return outside

    def _member(self, module: str, name: str) -> Unit:
        """`module.name`: its submodule if there is one, else a top-level name of it."""
        return (f"{module}.{name}", None) if f"{module}.{name}" in self.trees else (module, name)

    def _binds(self, module: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, Unit]]:
        """(bound name, what it is) for one import statement run in `module`."""
        if isinstance(node, ast.Import):
            return [(a.asname or a.name.split(".")[0], (a.name, None)) for a in node.names]
        source = node.module or ""
        if node.level:
            base = module if module in self.packages else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{source}".rstrip(".")
        if source not in self.trees:
            return [(a.asname or a.name, (source, None)) for a in node.names]
        return [(a.asname or a.name, self._member(source, a.name)) for a in node.names]


def _defined(node: ast.stmt) -> list[str]:
    """The top-level names a module statement defines."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else []
    if isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


class _References(ast.NodeVisitor):
    """The import statements, names and `name.attr` references of code that runs.

    At a module's top level (top_level=True) only what is called counts: the functions a
    def's body or a stored value names run when something reaches that def or value.
    """

    def __init__(self, top_level: bool):
        self.top_level = top_level
        self.imports: list[ast.Import | ast.ImportFrom] = []
        self.names: set[str] = set()
        self.attributes: set[tuple[str, str]] = set()

    def _called(self, node: ast.expr) -> None:
        if isinstance(node, ast.Name):
            self.names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            self.attributes.add((node.value.id, node.attr))
        else:
            self.visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module != "__future__":
            self.imports.append(node)

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self._called(node.func)
        for part in [*node.args, *node.keywords]:
            self.visit(part)

    def visit_Name(self, node: ast.Name) -> None:
        if not self.top_level:
            self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if not self.top_level and isinstance(node.value, ast.Name):
            self.attributes.add((node.value.id, node.attr))
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self._called(decorator)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        if not self.top_level:
            for statement in node.body:
                self.visit(statement)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for part in [*node.decorator_list, *node.bases]:
            self._called(part)
        for keyword in node.keywords:
            self.visit(keyword)
        for statement in node.body:  # the class body runs; its methods' bodies when reached
            self.visit(statement)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        pass  # annotations do not run (from __future__ import annotations)


def command_entries(command: str, params: dict[str, object], scan: ImportScan) -> list[Unit]:
    """Where `sae-audit <command>` starts: the console script, the CLI, the command's code."""
    entries: list[Unit] = [("sae_audit.warm", "main"), ("sae_audit.cli", "main")]
    stage = command.replace("-", "_")
    if stage in scan.defs["sae_audit.stages"]:
        return [*entries, ("sae_audit.stages", stage)]
    handlers = [
        node.name
        for nodes in scan.defs["sae_audit.cli"].values()
        for node in nodes
        if isinstance(node, ast.FunctionDef)
        for decorator in node.decorator_list
        if isinstance(decorator, ast.Call)
        and getattr(decorator.func, "id", None) == "command"
        and ast.literal_eval(decorator.args[0]) == command
    ]
    assert len(handlers) == 1, f"no stage or CLI handler for `sae-audit {command}`"
    entries.append(("sae_audit.cli", handlers[0]))
    if command == "plot":  # the registry calls sae_audit.plots.<figure> by name
        entries.append(("sae_audit.plots", str(params["figure"])))
    return entries


@functools.cache
def providers() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(modules: Iterable[str]) -> dict[str, str]:
    """Outside modules (top-level names) to the canonical distribution that provides each
    (stdlib: none); a module no installed distribution provides maps to '?<name>'."""
    out = {}
    for module in modules:
        if module in sys.stdlib_module_names or module == "sae_audit":
            continue
        found = providers().get(module)
        out[module] = canonical(found[0]) if found else f"?{module}"
    return out


def with_requirements(listed: Iterable[Requirement]) -> set[str]:
    """The listed distributions and, from their installed metadata, all they require."""
    have: set[str] = set()
    todo = [(canonical(r.name), frozenset(r.extras)) for r in listed]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        have.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((canonical(requirement.name), frozenset(requirement.extras)))
    return have


def workflow_rules() -> list[dict]:
    """Every rule of the workflow (test config) as Snakemake itself reads it."""
    import tempfile

    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with tempfile.TemporaryDirectory() as workdir, SnakemakeApi(OutputSettings(quiet=True)) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[TEST_CONFIG]),
            snakefile=ROOT / "Snakefile",
            workdir=Path(workdir),
        )._workflow
        return [
            {
                "name": rule.name,
                "env": Path(str(rule.conda_env)).name if rule.conda_env else None,
                "command": m[1]
                if (m := re.search(r"sae-audit ([\w-]+)", rule.shellcmd or ""))
                else None,
                "params": dict(rule.params.items()),
                "source": Path(rule.snakefile),
            }
            for rule in workflow.rules
        ]


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    return workflow_rules()


def test_every_command_rule_has_an_env_and_every_env_a_rule(rules):
    assert {r["name"] for r in rules if r["command"] and not r["env"]} == set()
    assert {r["env"] for r in rules if r["env"]} == {MODEL_ENV, TABLE_ENV}


def test_every_rule_env_holds_what_its_command_imports(rules):
    scan = ImportScan()
    holds = {
        env: with_requirements(env_requirements(env).values()) for env in (MODEL_ENV, TABLE_ENV)
    }
    missing = {}
    for rule in rules:
        if not rule["env"]:
            continue
        assert rule["command"], f"rule {rule['name']} has an env but runs no sae-audit command"
        modules = scan.imports(command_entries(rule["command"], rule["params"], scan))
        lacking = {
            module: dist
            for module, dist in distributions(modules).items()
            if dist not in holds[rule["env"]]
        }
        if lacking:
            missing[f"{rule['name']} (envs/{rule['env']})"] = lacking
    assert not missing, (
        f"envs lack what their rules' commands import (module: distribution): {missing}"
    )


def test_the_model_only_dependencies_are_what_only_model_rules_import(rules):
    """Each model-only dependency is imported by a model env rule and by no other: the
    analysis env can omit them, and the scan sees the lazy imports (torch in encode,
    llm-compressor in compress). snakemake is in the model env as a pyproject dependency."""
    scan = ImportScan()
    by_env: dict[str, set[str]] = {MODEL_ENV: set(), TABLE_ENV: set()}
    for rule in rules:
        if rule["env"]:
            imports = scan.imports(command_entries(rule["command"], rule["params"], scan))
            by_env[rule["env"]] |= set(distributions(imports).values())
    assert by_env[MODEL_ENV] >= MODEL_ONLY - {"snakemake"}
    assert not by_env[TABLE_ENV] & MODEL_ONLY


def test_the_scan_reaches_every_package_module_a_command_loads():
    """Against a real import: the package modules `fp-stats` and `fixture-corpus` load when
    their code's imports run (tests/test_imports.py's machinery) are ones the scan reached."""
    from tests.test_imports import SRC, stage_imports

    scan = ImportScan()
    for stage, lines in [
        ("fp_stats", stage_imports()["fp_stats"]),
        ("fixture_corpus", ["from sae_audit.fixture import CorpusConfig, build_corpus"]),
    ]:
        scan.imports(command_entries(stage.replace("_", "-"), {}, scan))
        code = "\n".join(["import sae_audit.cli", *lines, "import sys"])
        code += "\nprint(*sorted(m for m in sys.modules if m.startswith('sae_audit')))"
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        loaded = set(done.stdout.split())
        assert loaded <= scan.reached, f"{stage}: the scan missed {loaded - scan.reached}"


# ---------------------------------------------------------------- threads
def test_every_model_side_rule_declares_its_threads(rules):
    """A model rule's torch runs {threads} threads (sae_audit.threads): each says how many."""
    undeclared = []
    for rule in rules:
        if rule["env"] != MODEL_ENV:
            continue
        block = re.search(
            rf"^(?:rule|checkpoint) {rule['name']}:\n(.*?)(?=^[^\s#]|\Z)",
            rule["source"].read_text(),
            flags=re.M | re.S,
        )
        assert block, f"rule {rule['name']} not found in {rule['source']}"
        if not re.search(r"^\s+threads:", block[1], flags=re.M):
            undeclared.append(rule["name"])
    assert not undeclared, f"model-side rules without `threads:`: {undeclared}"
