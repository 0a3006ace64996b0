"""tests/conftest.py turns a skip into a failure unless missing hardware caused it: run pytest on a
throwaway suite (with that conftest) whose tests skip for allowed and for other reasons."""

import shutil
import subprocess
import sys
from pathlib import Path

SUITE = '''
import pytest

def test_no_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.skipif(True, reason="needs 2 CUDA GPUs: the DDP run")
def test_two_gpus():
    pass

def test_tracked_file_missing():
    pytest.skip("demo site not present")

@pytest.fixture
def needs_tool():
    pytest.skip("chromium not installed")

def test_tool_missing(needs_tool):
    pass

def test_runs():
    pass
'''


def _pytest(where: Path, name: str, text: str):
    shutil.copy(Path(__file__).with_name("conftest.py"), where / "conftest.py")
    (where / name).write_text(text)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", name],
                       cwd=where, capture_output=True, text=True, timeout=120)
    print(r.stdout)
    return r.returncode, r.stdout


def test_only_missing_hardware_may_skip(tmp_path):
    rc, out = _pytest(tmp_path, "test_suite.py", SUITE)
    assert rc == 1, out
    assert "SKIPPED [1] test_suite.py:5: needs a CUDA GPU" in out
    assert "SKIPPED [1] test_suite.py:7: needs 2 CUDA GPUs: the DDP run" in out
    assert "PASSED test_suite.py::test_runs" in out
    assert "FAILED test_suite.py::test_tracked_file_missing" in out and "ERROR test_suite.py::test_tool_missing" in out
    assert "skipped ('demo site not present'), but only missing hardware may skip" in out
    assert out.splitlines()[-1].startswith("1 failed, 1 passed, 2 skipped, 1 error")


def test_a_missing_dependency_fails_at_collection(tmp_path):
    rc, out = _pytest(tmp_path, "test_dependency.py",
                      'import pytest\nd = pytest.importorskip("d2a_no_such_module")\n\ndef test_a():\n    pass\n')
    assert rc == 2 and "ERROR test_dependency.py" in out, out  # a collection error: the run is interrupted
    assert "skipped (\"could not import 'd2a_no_such_module'" in out
