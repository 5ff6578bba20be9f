"""`make test` runs on pytest-xdist workers with `--dist loadgroup`: the groups in tests/conftest.py
must really keep their tests on one worker. A pytest upgrade once made xdist drop the groups without
a word (pytest-dev/pytest-xdist#1386), so this runs a small suite the same way and looks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

SUITE = '''
import pytest

XDIST_GROUPS = {"pair": ("test_grouped.py",)}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("::", 1)[0] in XDIST_GROUPS["pair"]:
            item.add_marker(pytest.mark.xdist_group("pair"))
'''


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path: Path):
    # the same hook as tests/conftest.py's, on a suite of its own
    from tests import conftest

    assert "vllm-server" in conftest.XDIST_GROUPS
    (tmp_path / "conftest.py").write_text(SUITE)
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(6))\ndef test_grouped(i):\n    pass\n")
    (tmp_path / "test_free.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(6))\ndef test_free(i):\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v",
                           "-o", "addopts=", "-o", "timeout=120"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    workers = {m["test"]: m["gw"] for m in re.finditer(r"\[(?P<gw>gw\d)\] \[\s*\d+%\] PASSED (?P<test>\S+)", proc.stdout)}
    grouped = {t: w for t, w in workers.items() if t.startswith("test_grouped.py")}
    assert len(grouped) == 6 and all(t.endswith("@pair") for t in grouped), proc.stdout[-3000:]
    assert len(set(grouped.values())) == 1, grouped
