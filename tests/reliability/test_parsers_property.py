"""Property tests (hypothesis) for every parser of untrusted input the project writes: the adapter
archive extractor, adapter_config.json and safetensors header checks, chat request bodies, the
shipped JSONL data and chat JSONL files, and the settings YAML.

Properties: any input either parses or raises the parser's own error (AdapterRejected, ValidationError,
SaLoRAError), never another exception; extraction never writes outside its directory and never
leaves a link; what is accepted round-trips."""

from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.adapters import archive, validation
from gateway.adapters.config import LifecycleConfig
from gateway.adapters.errors import AdapterRejected
from gateway.adapters.validation import BaseModelInfo
from gateway.openai.chat_completion.protocol import ChatCompletionRequest
from gateway.settings import load_settings
from salora import chat, datasets
from salora.errors import SaLoRAError

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # zips with repeated members
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = LifecycleConfig(max_members=8, max_unpacked_bytes=4096)

# --- the archive extractor ------------------------------------------------------------------------

SEGMENT = st.text("abcAB01._-", min_size=1, max_size=6).filter(lambda s: s.strip("."))  # not `.` or `..`
HOSTILE = st.sampled_from(["..", "../x", "/etc/passwd", "a/../../b", "C:evil", "a\\b", "./", ".", "", "a//b",
                           "adapter_config.json/../..", "/", "a\0b", "x/" * 40 + "deep"])
NAME = st.one_of(st.lists(SEGMENT, min_size=1, max_size=3).map("/".join), HOSTILE,
                 st.just("adapter_config.json"), st.just("sub/adapter_config.json"))
KIND = st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink", "fifo", "chardev"])
MEMBER = st.tuples(NAME, KIND, st.binary(max_size=1500))


def make_tar(members: list[tuple[str, str, bytes]], gz: bool) -> bytes:
    types = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
             "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = types[kind], "../../outside"
                tar.addfile(info)
    return buffer.getvalue()


def make_zip(members: list[tuple[str, str, bytes]]) -> bytes:
    modes = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "hardlink": stat.S_IFREG,
             "fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, kind, data in members:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/") else ""))
            info.external_attr = (modes[kind] | 0o644) << 16
            z.writestr(info, b"../../outside" if kind == "symlink" else data)
    return buffer.getvalue()


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def unpack_in_sandbox(filename: str, data: bytes) -> tuple[Path | None, set[Path], Path]:
    """Unpack `data` (uploaded as `filename`) in a fresh sandbox; returns the adapter root (None when
    rejected), what appeared outside the destination, and the destination."""
    sandbox = Path(tempfile.mkdtemp(prefix="unpack-"))
    upload, dest = sandbox / "upload.bin", sandbox / "dest"
    upload.write_bytes(data)
    dest.mkdir()
    before = snapshot(sandbox)
    try:
        root = archive.unpack([(filename, upload)], dest, LIMITS)
    except AdapterRejected as e:
        assert e.status in (400, 413) and e.code in ("unsafe_archive", "bad_archive", "too_large", "missing_file")
        root = None
    outside = {p for p in snapshot(sandbox) - before if dest not in p.parents}
    return root, outside, dest


@SETTINGS
@given(members=st.lists(MEMBER, max_size=10), form=st.sampled_from(["tar.gz", "tar", "zip"]))
def test_archives_unpack_inside_their_directory_or_are_rejected(members, form):
    data = make_zip(members) if form == "zip" else make_tar(members, gz=form == "tar.gz")
    root, outside, dest = unpack_in_sandbox(f"adapter.{form}", data)
    assert not outside, f"wrote outside the destination: {outside}"
    for path in dest.rglob("*"):
        assert not path.is_symlink() and (path.is_dir() or path.is_file())
        assert dest in path.resolve().parents
    if root is not None:
        assert root == dest or root.parent == dest
        assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= LIMITS.max_unpacked_bytes


@SETTINGS
@given(files=st.dictionaries(st.lists(SEGMENT, min_size=1, max_size=2).map("/".join), st.binary(max_size=400),
                             max_size=5),
       form=st.sampled_from(["tar.gz", "tar", "zip"]))
def test_safe_archives_round_trip(files, form):
    files = {"adapter_config.json": b"{}", **{n: d for n, d in files.items()
                                              if not any(other.startswith(n + "/") for other in files)}}
    members = [(name, "file", data) for name, data in files.items()]
    data = make_zip(members) if form == "zip" else make_tar(members, gz=form == "tar.gz")
    root, _, dest = unpack_in_sandbox(f"adapter.{form}", data)
    assert root == dest
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == {
        str(Path(n)): d for n, d in files.items()}


@SETTINGS
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x1f\x8b", b"PK\x03\x04", b"\x1f\x8b\x08\x00"]),
       filename=st.sampled_from(["a.tar.gz", "a.tgz", "a.tar", "a.zip", "adapter_config.json", "x/y.json", "a.bin"]))
def test_arbitrary_bytes_are_rejected_cleanly(data, prefix, filename):
    _, outside, _ = unpack_in_sandbox(filename, prefix + data)
    assert not outside


def test_a_bomb_stops_at_the_limit():
    bomb = make_zip([("adapter_config.json", "file", b"0" * (LIMITS.max_unpacked_bytes + 1))])
    with pytest.raises(AdapterRejected) as e:
        archive.unpack([("a.zip", write_temp(bomb))], Path(tempfile.mkdtemp()), LIMITS)
    assert e.value.status == 413 and e.value.code == "too_large"
    many = make_tar([(f"f{i}", "file", b"") for i in range(LIMITS.max_members + 1)], gz=True)
    with pytest.raises(AdapterRejected) as e:
        archive.unpack([("a.tgz", write_temp(many))], Path(tempfile.mkdtemp()), LIMITS)
    assert e.value.status == 413


def write_temp(data: bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / "upload.bin"
    path.write_bytes(data)
    return path


# --- adapter_config.json and the safetensors header -------------------------------------------------

BASE = BaseModelInfo("tiny", "0" * 64, {"model.layers.0.self_attn.q_proj": (8, 8),
                                         "model.layers.0.self_attn.v_proj": (4, 8)})
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
CONFIG_VALUES = {
    "peft_type": st.sampled_from(["LORA", "LOHA", None]) | JSON, "r": st.integers(-1, 80) | JSON,
    "lora_alpha": st.integers(0, 32) | st.floats() | JSON,
    "target_modules": st.sampled_from([["q_proj"], ["v_proj", "q_proj"], "q_proj", ".*q_proj", "(", "[", "a{2,1}", []])
    | JSON,
    "rank_pattern": st.dictionaries(st.text(max_size=6), st.integers(-1, 80), max_size=2) | JSON,
    "bias": st.sampled_from(["none", "all"]) | JSON, "use_dora": st.booleans() | JSON,
    "fan_in_fan_out": st.booleans(),
}
CONFIG = st.fixed_dictionaries({}, optional=CONFIG_VALUES).flatmap(
    lambda known: st.dictionaries(st.text(max_size=10), JSON, max_size=3).map(lambda extra: {**extra, **known}))


def header_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


TENSOR = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I64", "BOOL"]) | JSON,
                                "shape": st.lists(st.integers(0, 8), max_size=3) | JSON,
                                "data_offsets": st.tuples(st.integers(0, 64), st.integers(0, 300)).map(list) | JSON})
HEADER = st.dictionaries(st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                                          "__metadata__", "other"]) | st.text(max_size=5), TENSOR, max_size=3)


def validate_in_sandbox(config: bytes, weights: bytes) -> None:
    root = Path(tempfile.mkdtemp(prefix="adapter-"))
    (root / "adapter_config.json").write_bytes(config)
    (root / "adapter_model.safetensors").write_bytes(weights)
    (root / "work").mkdir()
    try:
        validation.validate(root, root / "work", BASE, max_rank=64)
    except AdapterRejected as e:
        assert e.status in (400, 422) and str(e)  # 422: a config field outside plain LoRA, named in `param`


@SETTINGS
@given(config=CONFIG, header=HEADER, data=st.binary(max_size=300))
def test_adapter_files_validate_or_are_rejected(config, header, data):
    validate_in_sandbox(json.dumps(config).encode(), header_bytes(header, data))


@SETTINGS
@given(config=st.binary(max_size=300), weights=st.binary(max_size=300))
def test_arbitrary_adapter_bytes_are_rejected(config, weights):
    validate_in_sandbox(config, weights)


@pytest.mark.parametrize("nested", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deeply_nested_json_is_rejected(nested):
    good = header_bytes({}, b"")
    validate_in_sandbox(nested, good)
    validate_in_sandbox(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).encode(),
                        struct.pack("<Q", len(nested)) + nested)


@pytest.mark.parametrize("pattern", ["(", "[q", "a{2,1}", "*", "q_proj", "(a|aa)*q_proj"])
def test_a_target_pattern_is_refused_before_it_runs(pattern):
    """A string `target_modules` is a regular expression to PEFT: refused, valid or not, never matched."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": pattern}
    a, b = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    header = {a: {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
              b: {"dtype": "F32", "shape": [8, 2], "data_offsets": [64, 128]}}
    root = Path(tempfile.mkdtemp(prefix="adapter-"))
    (root / "adapter_config.json").write_text(json.dumps(config))
    (root / "adapter_model.safetensors").write_bytes(header_bytes(header, bytes(128)))
    (root / "work").mkdir()
    with pytest.raises(AdapterRejected, match="a pattern is not accepted") as e:
        validation.validate(root, root / "work", BASE, max_rank=64)
    assert (e.value.status, e.value.param) == (422, "target_modules")


# --- chat request bodies ---------------------------------------------------------------------------

TEXT = st.text(max_size=30)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                   "text": TEXT}), max_size=3)})
REQUEST = st.fixed_dictionaries(
    {"model": TEXT, "messages": st.lists(MESSAGE, min_size=1, max_size=4)},
    optional={"max_tokens": st.integers(1, 10**6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "stop": TEXT.filter(bool) | st.lists(TEXT.filter(bool), max_size=4), "seed": st.integers(-2**63, 2**63 - 1),
              "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "n": st.just(1), "user": TEXT})


@SETTINGS
@given(body=REQUEST)
def test_valid_chat_requests_parse_and_round_trip(body):
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert ChatCompletionRequest.model_validate_json(request.model_dump_json()) == request
    for sent, parsed in zip(body["messages"], request.messages):
        content = sent["content"] if isinstance(sent["content"], str) else "".join(p["text"] for p in sent["content"])
        assert parsed.as_dict() == {"role": "system" if sent["role"] == "developer" else sent["role"], "content": content}
    stops = body.get("stop", [])
    assert request.stop == ([stops] if isinstance(stops, str) else stops)


@SETTINGS
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())
       | REQUEST.flatmap(lambda b: st.sampled_from(list(b)).flatmap(
           lambda k: JSON.map(lambda v: json.dumps({**b, k: v}).encode()))))
def test_any_chat_body_parses_or_fails_validation(raw):
    try:
        ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        assert e.errors()  # the route turns the first error into its 400


# --- JSONL data -----------------------------------------------------------------------------------

ROW = st.fixed_dictionaries({"id": TEXT, "category": TEXT, "split": st.sampled_from(["train", "canary", "x"]),
                             "prompt": TEXT, "refusal": TEXT})
LINES = st.lists(ROW.map(json.dumps) | JSON.map(json.dumps) | st.text(max_size=20), max_size=6).map("\n".join)


@SETTINGS
@given(content=LINES.map(str.encode) | st.binary(max_size=200))
def test_shipped_jsonl_parses_or_fails_with_one_line(content, monkeypatch_module):
    monkeypatch_module.setattr(datasets, "_data_bytes", lambda name: content)
    try:
        rows = datasets._rows("harmful.jsonl", ("id", "category", "split", "prompt", "refusal"))
    except SaLoRAError as e:
        assert "\n" not in str(e).strip() or "harmful.jsonl" in str(e)
    else:
        assert rows and all(set(r) == {"id", "category", "split", "prompt", "refusal"} for r in rows)


@SETTINGS
@given(content=st.binary(max_size=300) | st.lists(st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)})
                                                    | JSON, max_size=4).map(
    lambda rows: "\n".join(json.dumps(r) for r in rows).encode()))
def test_chat_jsonl_parses_or_fails_cleanly(content):
    path = write_temp(content).with_suffix(".jsonl")
    path.write_bytes(content)
    try:
        conversations = chat.read_chat_jsonl(path, need_assistant=False)
    except SaLoRAError:
        return
    assert all(c and all(set(m) == {"role", "content"} for m in c) for c in conversations)


@SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({"messages": st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
    min_size=1, max_size=3)}), min_size=1, max_size=4))
def test_chat_jsonl_round_trips(rows):
    path = Path(tempfile.mkdtemp()) / "data.jsonl"
    datasets.write_jsonl(rows, path)
    assert chat.read_chat_jsonl(path, need_assistant=False) == [r["messages"] for r in rows]


# --- settings YAML --------------------------------------------------------------------------------

SETTING_VALUES = {"port": st.integers(-5, 70_000) | JSON, "limits": st.fixed_dictionaries(
    {}, optional={"max_tokens": st.integers(-1, 5000) | JSON, "default_max_tokens": st.integers(-1, 5000),
                  "max_messages": st.integers(-1, 10) | JSON, "max_concurrent_streams": st.integers(-1, 10)}) | JSON,
                  "tenants": st.lists(st.fixed_dictionaries({"name": TEXT, "key_sha256": st.just("0" * 64) | TEXT}),
                                      max_size=2) | JSON,
                  "engine": st.sampled_from(["local", "vllm", "x"]) | JSON, "rate_window_s": st.floats() | JSON,
                  "lifecycle": st.fixed_dictionaries({}, optional={"max_members": st.integers(-1, 9) | JSON}) | JSON}


@SETTINGS
@given(document=st.fixed_dictionaries({}, optional=SETTING_VALUES).map(yaml.safe_dump)
       | JSON.map(yaml.safe_dump) | st.text(max_size=60))
def test_settings_yaml_loads_or_fails_with_one_line(document, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "gateway.yaml"
    path.write_text(document)
    try:
        load_settings(path, state_dir=str(path.parent))
    except SaLoRAError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch
