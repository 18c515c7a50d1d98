"""What a Snakemake user expects: every config key described, every rule with a docstring,
config/README.md, the workflow catalog's file, and deployment as a module."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sae_audit.figures import FIGURE_REGISTRY

from .conftest import ROOT, planned_jobs

SCHEMA = ROOT / "src/sae_audit/config.schema.yaml"


def undescribed_keys(node: dict[str, Any], path: str = "") -> list[str]:
    """Dotted paths of the properties, at every depth, that lack a non-empty description;
    the entries of a map (additionalProperties with a schema) are written <name>."""
    children = [
        (f"{path}.{key}".lstrip("."), sub) for key, sub in node.get("properties", {}).items()
    ]
    if isinstance(node.get("additionalProperties"), dict):
        children.append((f"{path}.<name>".lstrip("."), node["additionalProperties"]))
    missing = []
    for child_path, child in children:
        description = child.get("description")
        if not (isinstance(description, str) and description.strip()):
            missing.append(child_path)
        missing += undescribed_keys(child, child_path)
    if isinstance(node.get("items"), dict):
        missing += undescribed_keys(node["items"], f"{path}[]")
    return missing


def test_undescribed_keys_finds_nested_map_and_item_keys():
    schema = yaml.safe_load(
        """
        properties:
          top: {type: integer, description: described}
          section:
            description: described
            properties:
              bare: {type: integer}
              blank: {type: integer, description: "  "}
          named:
            description: described
            additionalProperties:
              properties: {inner: {type: string}}
          rows:
            description: described
            items: {properties: {cell: {type: string}}}
        """
    )
    assert undescribed_keys(schema) == [
        "section.bare",
        "section.blank",
        "named.<name>",
        "named.<name>.inner",
        "rows[].cell",
    ]


def test_every_schema_key_has_a_description():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert undescribed_keys(schema) == []
    # The walk reached the deep keys, not only the sections.
    models = schema["properties"]["models"]["additionalProperties"]["properties"]
    assert "description" in models["tokens"]["properties"]["dataset"]["properties"]["split"]


def list_rules() -> list[str]:
    """`snakemake --list-rules` on the default config, from the repository root."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--list-rules"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_list_rules_describes_every_rule():
    lines = list_rules()
    # snakemake prints a documented rule as "name (docstring)", an undocumented one bare.
    documented = dict(m.groups() for line in lines if (m := re.fullmatch(r"(\w+) \((.+)\)", line)))
    assert [line for line in lines if line.split(" ")[0] not in documented] == []
    figure_rules = {f"plot_{name}" for name in FIGURE_REGISTRY}
    assert {"all", "encode", "compress", "survival", "report_tables"} | figure_rules <= set(
        documented
    )
    # The loop's f-string docstring was formatted per figure, not printed as a template.
    assert all("{" not in documented[rule] for rule in figure_rules)


def test_config_readme_names_every_section():
    readme = (ROOT / "config/README.md").read_text()
    schema = yaml.safe_load(SCHEMA.read_text())
    assert [s for s in schema["properties"] if f"`{s}`" not in readme] == []
    assert "config/paper.yaml" in readme and "config.schema.yaml" in readme


def test_catalog_file_says_how_to_deploy_and_install():
    catalog = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())
    usage = catalog["usage"]
    assert set(usage) <= {"mandatory-flags", "software-stack-deployment", "report"}
    assert set(usage["mandatory-flags"]) == {"desc", "flags"}
    desc = usage["mandatory-flags"]["desc"]
    assert "snakedeploy deploy-workflow" in desc and "pip install" in desc
    deployment = usage["software-stack-deployment"]
    assert any(deployment.values()) and all(isinstance(v, bool) for v in deployment.values())
    assert usage["report"] is True


# The deploying workflow as `snakedeploy deploy-workflow` writes it, except the module's
# snakefile: from GitHub it writes github("<owner>/sae-audit", path="Snakefile", tag=...);
# from a local path (snakedeploy 0.17) the bare "Snakefile", which Snakemake resolves
# next to the deploying Snakefile, i.e. to itself (RecursionError, shown as KeyError: 25).
# Here it is the checkout's Snakefile by absolute path, which is what that line must say.
DEPLOYING_SNAKEFILE = """\
from snakemake.utils import min_version


min_version("6.10.0")


configfile: "config/config.yaml"


module sae_audit:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from sae_audit
"""


def job_blocks(dry_run_output: str, rule: str) -> list[str]:
    """The dry-run's printed blocks of the jobs of one rule."""
    return [
        block
        for block in re.split(r"\n(?=rule \w+:|localrule \w+:)", dry_run_output)
        if re.match(rf"(local)?rule {rule}:", block)
    ]


def test_module_deployment_dry_runs(tmp_path: Path):
    """The workflow used as a module from another directory, on the default config (a
    dry-run: seconds): the shipped reference CSV resolves from the workflow, the user's
    text file from the working directory, and outputs land under it."""
    (tmp_path / "workflow").mkdir()
    (tmp_path / "workflow/Snakefile").write_text(
        DEPLOYING_SNAKEFILE.format(snakefile=ROOT / "Snakefile")
    )
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["models"]["fixture"]["reference"] = "config/reference/pythia-70m.csv"
    user_text = Path("texts/eval.txt")
    (tmp_path / user_text).parent.mkdir()
    (tmp_path / user_text).write_text("A user's own evaluation text.\n\n" * 100)
    config["models"]["fixture-reparam"]["tokens"].update(source="text", paths=[str(user_text)])
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text(yaml.safe_dump(config))

    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    jobs = planned_jobs(proc)
    assert jobs["all"] == 1 and jobs["reference_comparison"] == 1
    [reference_job] = job_blocks(output, "reference_comparison")
    assert f"input: {ROOT / 'config/reference/pythia-70m.csv'}," in reference_job
    [user_tokens_job] = [
        block for block in job_blocks(output, "tokenize") if "model=fixture-reparam" in block
    ]
    assert f"input: {user_text}," in user_tokens_job
    assert "output: results/tokens/fixture-reparam" in user_tokens_job
