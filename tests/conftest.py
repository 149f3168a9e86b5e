import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# runs made by tests (and their trainer subprocesses) keep their plan history apart from the developer's
os.environ["TUNESMITH_PLAN_HISTORY"] = os.path.join(
    tempfile.mkdtemp(prefix="tunesmith-test-"), "history.jsonl"
)

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture
def tok():
    return tiny.tokenizer()


@pytest.fixture
def model_dir(tmp_path):
    return tiny.save_model_dir(tmp_path / "tiny-neox")


@pytest.fixture
def qa_file(tmp_path):
    return tiny.write_qa(tmp_path / "qa.jsonl")
