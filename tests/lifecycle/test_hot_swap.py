"""Hot loading under load: while clients keep calling the base model and another adapter, streamed and
not, an upload is validated, loaded, probed and promoted, and another is rejected and unloaded. Not one
request fails."""

from __future__ import annotations

import threading
import time

from tests.lifecycle.conftest import SameAsBaseJudge, adapter_files, lifecycle_settings, make_lora, running, upload, wait_state


def test_upload_and_promotion_under_traffic_fail_no_request(tmp_path, gateway_model_dir, adapter_dirs):
    settings = lifecycle_settings(tmp_path / "state", gateway_model_dir, adapters={"alpha": adapter_dirs["alpha"]})
    with running(settings, SameAsBaseJudge()) as gw:
        key = gw.admin("POST", "/admin/tenants", json={"name": "root", "adapters": ["*"]}).json()["key"]
        stop = threading.Event()
        done: list[tuple[float, str, str]] = []  # (time, model, "ok" or the error)

        def traffic(model: str, stream: bool) -> None:
            client = gw.client(key, timeout=120)
            while not stop.is_set():
                try:
                    kwargs = {"model": model, "messages": [{"role": "user", "content": f"Say something about {len(done)}"}],
                              "max_tokens": 8, "temperature": 0}
                    if stream:
                        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                            stream=True, **kwargs) if c.choices)
                    else:
                        text = client.chat.completions.create(**kwargs).choices[0].message.content
                    done.append((time.monotonic(), model, "ok" if text is not None else "no text"))
                except Exception as e:  # any failure is what this test looks for
                    done.append((time.monotonic(), model, repr(e)))

        threads = [threading.Thread(target=traffic, args=args) for args in
                   (("tiny", False), ("alpha", True), ("tiny", True), ("alpha", False))]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1)
            started = time.monotonic()
            assert upload(gw, "fresh", adapter_files(make_lora(gateway_model_dir, tmp_path / "a"))).status_code == 202
            assert upload(gw, "unsafe", adapter_files(make_lora(gateway_model_dir, tmp_path / "b", std=0.3,
                                                                seed=9))).status_code == 202
            assert wait_state(gw, "fresh")["state"] == "live"
            assert wait_state(gw, "unsafe")["state"] == "rejected"
            promoted = time.monotonic()
            answer = gw.chat(key, "fresh", "hello", max_tokens=4)
            assert answer.usage.completion_tokens == 4
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        failures = [d for d in done if d[2] != "ok"]
        assert not failures, failures[:5]
        during = [d for d in done if started <= d[0] <= promoted]
        assert {d[1] for d in during} == {"tiny", "alpha"} and len(during) >= 8, f"only {len(during)} requests overlapped"
        statuses = {s.split('status="')[1].split('"')[0] for s in gw.metrics().splitlines()
                    if s.startswith("salora_requests_total{") and not s.endswith(" 0.0")}
        assert statuses == {"200"}
