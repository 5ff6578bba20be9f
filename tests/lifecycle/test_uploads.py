"""A corpus of bad uploads: each is refused with a 4xx that says why, and leaves nothing behind but a
rejected record with the reason (no stored or scratch file, nothing loaded in the engine, no tenant
grant)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import IA3Config, get_peft_model
from safetensors.torch import load, save
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from tests.gateway.conftest import ADMIN_KEY, LiveGateway
from tests.lifecycle.conftest import (SameAsBaseJudge, adapter_files, lifecycle_settings, make_lora, running,
                                      tar_gz, upload, zip_bytes)

LIMITS = {"max_upload_bytes": 2 << 20, "max_unpacked_bytes": 1 << 20, "max_members": 8, "max_rank": 8}
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Files = dict[str, bytes]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, gateway_model_dir: Path) -> Iterator[LiveGateway]:
    settings = lifecycle_settings(tmp_path_factory.mktemp("uploads-state"), gateway_model_dir, lifecycle=LIMITS)
    with running(settings, SameAsBaseJudge()) as live:
        assert live.admin("POST", "/admin/tenants", json={"name": "acme", "adapters": []}).status_code == 201
        yield live


def other_llama(out: Path, tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int) -> Path:
    """Another base: a different width or depth than the served tiny model."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, gateway_model_dir: Path,
           smollm_tokenizer: PreTrainedTokenizerBase) -> dict[str, Files]:
    """Adapters built for real (PEFT save_pretrained), some then damaged on purpose."""
    root = tmp_path_factory.mktemp("corpus")
    good = adapter_files(make_lora(gateway_model_dir, root / "good", std=0.1))
    torch.manual_seed(0)
    pickled = get_peft_model(LlamaForCausalLM.from_pretrained(gateway_model_dir),
                             __import__("peft").LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pickled.save_pretrained(root / "pickled", safe_serialization=False)
    ia3 = get_peft_model(LlamaForCausalLM.from_pretrained(gateway_model_dir),
                         IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(root / "ia3")
    return {
        "good": good,
        "pickled": adapter_files(root / "pickled"),
        "wider": adapter_files(make_lora(other_llama(root / "wide-base", smollm_tokenizer, 32, 2), root / "wider")),
        "deeper": adapter_files(make_lora(other_llama(root / "deep-base", smollm_tokenizer, 64, 4), root / "deeper")),
        "dora": adapter_files(make_lora(gateway_model_dir, root / "dora", use_dora=True)),
        "rank16": adapter_files(make_lora(gateway_model_dir, root / "rank16", rank=16)),
        "ia3": adapter_files(root / "ia3"),
    }


def with_weights(files: Files, change: Callable[[dict[str, torch.Tensor]], None]) -> Files:
    tensors = {k: v.clone() for k, v in load(files[WEIGHTS]).items()}
    change(tensors)
    return {**files, WEIGHTS: save(tensors)}


def nan_weights(files: Files) -> Files:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        next(t for k, t in sorted(tensors.items()) if "lora_A" in k)[0, 0] = float("nan")
    return with_weights(files, poison)


def tar_with(members: list[tarfile.TarInfo], files: Files) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for member in members:
            tar.addfile(member)
    return buffer.getvalue()


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def zip_symlink(files: Files) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("adapter/evil")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def zip_bomb(files: Files) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("zeros.txt", b"\0" * (4 << 20))  # 4 MiB that compress to a few KiB
    return buffer.getvalue()


# (case id, files to send as built from the corpus, HTTP status, error code, words the message must contain)
CASES: list[tuple[str, Callable[[dict[str, Files]], Files], int, str, str]] = [
    ("pickle-bin", lambda c: c["pickled"], 400, "pickle_not_allowed", "adapter_model.bin"),
    ("wrong-base-width", lambda c: c["wider"], 400, "wrong_base", "made for another model"),
    ("wrong-base-depth", lambda c: c["deeper"], 400, "wrong_base", "does not exist in the base"),
    ("nan-weights", lambda c: nan_weights(c["good"]), 400, "non_finite_weights", "NaN"),
    ("dot-dot-path", lambda c: {"a.tar.gz": tar_gz(c["good"], prefix="../")}, 400, "unsafe_archive", "`..`"),
    ("absolute-path", lambda c: {"a.tar.gz": tar_gz(c["good"], prefix="/tmp/")}, 400, "unsafe_archive", "absolute"),
    ("tar-symlink", lambda c: {"a.tar.gz": tar_with([special("evil", tarfile.SYMTYPE, "/etc/passwd")], c["good"])},
     400, "unsafe_archive", "is a link"),
    ("tar-hardlink", lambda c: {"a.tar.gz": tar_with([special("evil", tarfile.LNKTYPE, CONFIG)], c["good"])},
     400, "unsafe_archive", "is a link"),
    ("tar-device", lambda c: {"a.tar.gz": tar_with([special("dev", tarfile.CHRTYPE)], c["good"])},
     400, "unsafe_archive", "not a regular file"),
    ("zip-symlink", lambda c: {"a.zip": zip_symlink(c["good"])}, 400, "unsafe_archive", "is a link"),
    ("zip-bomb", lambda c: {"a.zip": zip_bomb(c["good"])}, 413, "too_large", "unpacks to more than"),
    ("too-many-members", lambda c: {"a.zip": zip_bytes({**c["good"], **{f"f{i}.txt": b"x" for i in range(9)}})},
     413, "too_large", "more than 8 members"),
    ("oversize-body", lambda c: {**c["good"], "README.md": b"x" * (3 << 20)}, 413, "too_large", "larger than"),
    ("missing-config", lambda c: {WEIGHTS: c["good"][WEIGHTS]}, 400, "missing_file", "adapter_config.json"),
    ("missing-weights", lambda c: {CONFIG: c["good"][CONFIG]}, 400, "missing_file", WEIGHTS),
    ("dora", lambda c: c["dora"], 422, "unsupported_adapter", "use_dora"),
    ("rank-too-large", lambda c: c["rank16"], 422, "rank_too_large", "limit of 8"),
    ("not-lora", lambda c: c["ia3"], 422, "unsupported_adapter", "only LORA"),
    ("extra-tensor", lambda c: with_weights(c["good"], lambda t: t.__setitem__("base_model.model.lm_head.weight",
                                                                               torch.zeros(4, 4))),
     400, "unsupported_adapter", "unexpected tensor"),
    ("unpaired-factor", lambda c: with_weights(c["good"], lambda t: t.pop(next(k for k in sorted(t) if "lora_B" in k))),
     400, "bad_weights", "must come together"),
    ("truncated-weights", lambda c: {**c["good"], WEIGHTS: c["good"][WEIGHTS][:-10]}, 400, "bad_weights", "header"),
    ("header-too-long", lambda c: {**c["good"], WEIGHTS: (1 << 40).to_bytes(8, "little") + b"{}"}, 400, "bad_weights",
     "impossible"),
    ("config-not-json", lambda c: {**c["good"], CONFIG: b"{nope"}, 400, "invalid_adapter", "not valid JSON"),
    ("path-in-file-name", lambda c: {"../adapter_config.json": c["good"][CONFIG], WEIGHTS: c["good"][WEIGHTS]},
     400, "unsafe_archive", "plain name"),
    ("fake-archive", lambda c: {"a.zip": b"this is not a zip file"}, 400, "bad_archive", "not a tar or zip"),
    ("two-archives", lambda c: {"a.zip": zip_bytes(c["good"]), "b.tar.gz": tar_gz(c["good"])}, 400, "bad_archive",
     "one archive"),
    ("two-adapters", lambda c: {"a.zip": zip_bytes({**{f"x/{k}": v for k, v in c["good"].items()},
                                                    **{f"y/{k}": v for k, v in c["good"].items()}})},
     400, "bad_archive", "more than one adapter"),
    ("bad-checkpoint", lambda c: {"salora_config.json": json.dumps({"method": "salora"}).encode()}, 400,
     "bad_checkpoint", "cannot be exported"),
]


def assert_no_residue(gw: LiveGateway) -> None:
    """A refused upload leaves at most a rejected record saying why, and no file, load or grant."""
    records = gw.admin("GET", "/admin/adapters").json()["data"]
    assert all(r["state"] == "rejected" and r["reason"] and r["sha256"] is None for r in records), records
    store = gw.ctx.settings.state_dir / "adapters"
    assert [p.name for p in store.iterdir()] == [".incoming"]
    assert list((store / ".incoming").iterdir()) == []
    assert gw.ctx.engine.adapters() == frozenset() and gw.ctx.lifecycle.held_back == frozenset()
    assert gw.ctx.tenants.get("acme").adapters == frozenset()
    assert 'salora_adapters{state="uploaded"} 0.0' in gw.metrics()


@pytest.mark.parametrize(("files", "status", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_upload_is_refused_with_its_reason_and_no_residue(gw, corpus, files, status, code, words):
    response = upload(gw, "candidate", files(corpus), tenants=("acme",))
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (status, code), error
    assert words in error["message"], error["message"]
    assert_no_residue(gw)


def test_chunked_oversize_body_stops_at_the_limit(gw, corpus):
    """Without a Content-Length the body is counted as it streams and cut at the limit."""
    boundary = "salora-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"{WEIGHTS}\"\r\n\r\n").encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(3 << 4):  # 3 MiB in 64 KiB chunks
            yield b"\0" * (1 << 16)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(f"{gw.url}/admin/adapters", content=body(), timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                   "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert_no_residue(gw)


@pytest.mark.parametrize(("form", "status", "code"), [
    ({"name": "bad name!"}, 400, None),
    ({"name": "ok", "tenants": "nobody"}, 400, "unknown_tenant"),
])
def test_bad_fields(gw, corpus, form, status, code):
    response = gw.admin("POST", "/admin/adapters", data=form, files=[("file", (CONFIG, corpus["good"][CONFIG]))])
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text


def test_not_multipart_is_400(gw):
    response = gw.admin("POST", "/admin/adapters", json={"name": "x"})
    assert response.status_code == 400 and "multipart" in response.json()["error"]["message"]


@pytest.mark.parametrize(("content_type", "body"), [
    ("multipart/form-data", b"--x\r\n"),
    ("multipart/form-data; boundary=x", b"no parts at all"),
])
def test_malformed_multipart_is_400(gw, content_type, body):
    response = httpx.post(f"{gw.url}/admin/adapters", content=body,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": content_type})
    assert response.status_code == 400 and "malformed multipart body" in response.json()["error"]["message"]
    assert_no_residue(gw)


def test_admin_key_required(gw, corpus):
    response = httpx.post(f"{gw.url}/admin/adapters", data={"name": "x"}, files=[("file", (CONFIG, b"{}"))])
    assert response.status_code == 401


def test_the_good_adapter_of_the_corpus_is_accepted(gw, corpus):
    """The corpus's damaged cases start from this adapter, so each rejection is due to its damage.
    (Last in this module: it leaves records behind, as it should.)"""
    for name, files in (("good-files", corpus["good"]), ("good-tar", {"a.tgz": tar_gz(corpus["good"], "x/")}),
                        ("good-zip", {"a.zip": zip_bytes(corpus["good"])})):
        response = upload(gw, name, files)
        assert response.status_code == 202, response.text
        assert response.json()["state"] == "probing"
