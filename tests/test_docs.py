"""The docs agree with the code: docs/gateway.md's settings reference lists exactly the fields of
`gateway.settings.Settings` (nested sections included) at their defaults, and the design reference
the code cites exists."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

from gateway.settings import Settings

REPO = Path(__file__).resolve().parents[1]
GATEWAY_DOC = REPO / "docs" / "gateway.md"


def marked_yaml(doc: Path, marker: str) -> dict:
    """The YAML block right after `<!-- settings: MARKER -->`."""
    text = doc.read_text(encoding="utf-8")
    match = re.search(rf"<!-- settings: {marker} -->\s*```yaml\n(.*?)```", text, re.S)
    assert match, f"{doc.name}: no yaml block after <!-- settings: {marker} -->"
    return yaml.safe_load(match.group(1))


def unwrap(annotation: Any) -> tuple[str, Any]:
    """('model', cls) for a BaseModel or an optional one, ('list', cls) / ('dict', cls) for a list or
    dict of models, ('value', None) for anything else."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return unwrap(args[0]) if len(args) == 1 else ("value", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    if origin is list:
        (item,) = typing.get_args(annotation)
        return ("list", item) if isinstance(item, type) and issubclass(item, BaseModel) else ("value", None)
    if origin is dict:
        _, value = typing.get_args(annotation)
        return ("dict", value) if isinstance(value, type) and issubclass(value, BaseModel) else ("value", None)
    return "value", None


def plain(value: Any) -> Any:
    """A default as YAML would write it."""
    if isinstance(value, BaseModel):
        return {k: plain(v) for k, v in value.model_dump().items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value


def check_defaults(model: type[BaseModel], doc: dict, where: str, problems: list[str]) -> None:
    """Every field of `model` documented once, at its default; nested sections the same way."""
    fields = model.model_fields
    for name in sorted(set(fields) - set(doc)):
        problems.append(f"{where}{name}: not documented")
    for name in sorted(set(doc) - set(fields)):
        problems.append(f"{where}{name}: documented but not a setting")
    for name in sorted(set(fields) & set(doc)):
        field, value = fields[name], doc[name]
        kind, cls = unwrap(field.annotation)
        if kind == "model" and isinstance(value, dict):
            check_defaults(cls, value, f"{where}{name}.", problems)
        elif field.default_factory is not None:
            continue  # computed at start (state_dir: $SALORA_HOME/gateway)
        elif field.is_required():
            problems.append(f"{where}{name}: required, so it has no default to document")
        elif plain(field.default) != value:
            problems.append(f"{where}{name}: documented {value!r}, default {plain(field.default)!r}")


def check_names(model: type[BaseModel], doc: dict, where: str, problems: list[str], complete: bool = True) -> None:
    """The documented keys are fields of `model` (all of them when `complete`); nested models alike."""
    fields = model.model_fields
    if complete:
        for name in sorted(set(fields) - set(doc)):
            problems.append(f"{where}{name}: not documented")
    for name in sorted(set(doc) - set(fields)):
        problems.append(f"{where}{name}: documented but not a setting")
    for name in sorted(set(fields) & set(doc)):
        kind, cls = unwrap(fields[name].annotation)
        value = doc[name]
        if kind == "model" and isinstance(value, dict):
            check_names(cls, value, f"{where}{name}.", problems, complete)
        elif kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                check_names(cls, item, f"{where}{name}[{i}].", problems, complete)
        elif kind == "dict" and isinstance(value, dict):
            for key, item in value.items():
                check_names(cls, item, f"{where}{name}.{key}.", problems, complete=False)


def empty_sections(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of the fields whose model-typed contents a default leaves out: optional models
    (`vllm`, `canary.judge`), lists and dicts of models (`tenants`, `engines`)."""
    paths = set()
    for name, field in model.model_fields.items():
        kind, cls = unwrap(field.annotation)
        if kind == "model" and field.is_required() is False and field.default is None:
            paths.add(prefix + name)
        elif kind in ("list", "dict"):
            paths.add(prefix + name)
        elif kind == "model":
            paths |= empty_sections(cls, f"{prefix}{name}.")
    return paths


def lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def test_settings_reference_lists_every_setting_at_its_default():
    problems: list[str] = []
    check_defaults(Settings, marked_yaml(GATEWAY_DOC, "defaults"), "", problems)
    assert not problems, "docs/gateway.md settings reference vs gateway/settings.py:\n" + "\n".join(problems)


def test_sections_empty_by_default_are_documented_with_all_their_fields():
    sections = marked_yaml(GATEWAY_DOC, "sections")
    problems: list[str] = []
    check_names(Settings, sections, "", problems, complete=False)
    # each section a default leaves empty is shown; an optional model or a list's item with every field
    for path in sorted(empty_sections(Settings)):
        model: Any = Settings
        for part in path.split("."):
            kind, model = unwrap(model.model_fields[part].annotation)
        doc = lookup(sections, path)
        if not doc:
            problems.append(f"{path}: empty by default and not shown in the sections block")
        elif kind == "model":
            check_names(model, doc, f"{path}.", problems)
        elif kind == "list":
            check_names(model, doc[0], f"{path}[0].", problems)
    assert not problems, "docs/gateway.md sections vs gateway/settings.py:\n" + "\n".join(problems)


def test_the_sections_block_is_a_valid_configuration(tmp_path: Path):
    """Copied into a config file (with the paths it names made real), it loads."""
    sections = marked_yaml(GATEWAY_DOC, "sections")
    adapter = tmp_path / "support-bot"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    sections["adapters"] = {"support-bot": str(adapter)}
    sections["vllm"]["adapter_dir"] = str(tmp_path)
    settings = Settings(**sections, state_dir=tmp_path / "state")
    assert settings.tenants[0].name == "acme" and settings.canary.judge is not None
    assert settings.routes == {"acme-support": "acme-dedicated"}


def test_no_documented_example_opens_an_unauthenticated_gateway_to_the_network():
    """A YAML example that binds beyond loopback must also set an admin key or tenants."""
    problems = []
    for doc in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]:
        for block in re.findall(r"```ya?ml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            config = yaml.safe_load(block)
            if isinstance(config, dict) and config.get("host") not in (None, "127.0.0.1", "localhost", "::1"):
                if not config.get("admin_key") and not config.get("tenants") and not config.get("allow_open"):
                    problems.append(f"{doc.name}: host {config['host']} with neither admin_key nor tenants")
    assert not problems, problems


def test_design_reference_exists_and_every_citation_points_at_it():
    design = REPO / "docs" / "design.md"
    text = design.read_text(encoding="utf-8")
    for section in ("## 1. SaLoRA", "## 2. Export", "## 3. Serving", "## 4. Metrics"):
        assert section in text
    stale = []
    for folder in ("salora", "salora_cli", "gateway", "docs", "deploy", "tests"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yml", ".yaml", ".json") and path != Path(__file__):
                if "DESIGN.md" in path.read_text(encoding="utf-8", errors="replace"):
                    stale.append(str(path.relative_to(REPO)))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "DESIGN.md" not in readme and not stale, stale


def test_engine_error_kinds_documented_are_the_ones_the_code_counts():
    """docs/observability.md's `kind` values of salora_engine_errors_total against every kind the
    gateway's code raises or counts."""
    code = set()
    for path in (REPO / "gateway").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        code |= set(re.findall(r'kind="(\w+)"', text))
        code |= set(re.findall(r'kind: str = "(\w+)"', text))  # EngineError's default
        code |= set(re.findall(r'_on_error\("(\w+)"\)', text))
        code |= set(re.findall(r'engine_errors\.labels\([^,()]+, "(\w+)"\)', text))
    row = next(line for line in (REPO / "docs" / "observability.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| `salora_engine_errors_total`"))
    documented = set(re.findall(r"`(\w+)`", row.split("`kind`", 1)[1]))
    assert documented == code, f"documented only: {sorted(documented - code)}; in the code only: {sorted(code - documented)}"
