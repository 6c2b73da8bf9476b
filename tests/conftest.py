import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from fake_topology import epyc_vm, graviton, no_numa, sapphire_rapids  # noqa: E402,F401 (fixtures)
from servers import start_draft, start_target  # noqa: E402
from tiny_models import build_llama, build_tokenizer, first_layers_of, save  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run models in the test process (`pytestmark = pytest.mark.usefixtures(...)`): one intra-op
    thread, as on two cores a second one only fights the servers and the draft, and OpenMP threads waiting on each
    other on a busy machine cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny target; drafts: unrelated (low acceptance), the target's first layer (partial agreement), and one
    whose vocabulary differs."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer()
    target = build_llama(seed=0)
    return {
        "target": save(target, tokenizer, root / "target"),
        "related_draft": save(first_layers_of(target, 1), tokenizer, root / "related"),
        "unrelated_draft": save(build_llama(seed=1, hidden_size=32, num_layers=1), tokenizer, root / "draft"),
        "mismatched_draft": save(build_llama(seed=2, vocab_size=300, hidden_size=32, num_layers=1), None,
                                 root / "mismatched"),
    }


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


def _running(server):
    """Serve a session-scoped server to the tests, then check it shut down cleanly (exit status 0)."""
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="session")
def unrelated_draft(model_dirs, log_dir):
    yield from _running(start_draft(model_dirs["unrelated_draft"], log_dir, "unrelated-draft"))


@pytest.fixture(scope="session")
def self_draft(model_dirs, log_dir):
    """The target model serving as its own draft: every draft token is accepted under greedy decoding."""
    yield from _running(start_draft(model_dirs["target"], log_dir, "self-draft"))


@pytest.fixture(scope="session")
def related_draft(model_dirs, log_dir):
    yield from _running(start_draft(model_dirs["related_draft"], log_dir, "related-draft"))


@pytest.fixture(scope="session")
def target_related(model_dirs, log_dir, related_draft):
    yield from _running(start_target(model_dirs["target"], log_dir, "target-related", [related_draft.address]))


@pytest.fixture(scope="session")
def target_unrelated(model_dirs, log_dir, unrelated_draft):
    yield from _running(start_target(model_dirs["target"], log_dir, "target-unrelated", [unrelated_draft.address]))


@pytest.fixture(scope="session")
def target_self(model_dirs, log_dir, self_draft):
    yield from _running(start_target(model_dirs["target"], log_dir, "target-self", [self_draft.address]))


@pytest.fixture(scope="session")
def target_alone(model_dirs, log_dir):
    yield from _running(start_target(model_dirs["target"], log_dir, "target-alone", []))


@pytest.fixture(scope="session")
def reference(model_dirs):
    """The target model alone, in this process: what every splitspec output must equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["target"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["target"])

    def greedy(prompt: str, max_new_tokens: int, ignore_eos: bool = True) -> list[int]:
        import torch

        input_ids = torch.tensor([tokenizer.encode(prompt)])
        kwargs = {"eos_token_id": None} if ignore_eos else {}
        with torch.no_grad():
            output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        return output[0, input_ids.shape[1]:].tolist()

    greedy.tokenizer = tokenizer
    greedy.model = model
    return greedy


@pytest.fixture(scope="session")
def prompt_cut_inside_a_character(reference):
    """(prompt token ids, character): a prompt whose last token is the first byte of a two-byte character and whose
    greedy continuation's first token is the byte that completes it, as when a completion that ended mid-character
    is continued. This tiny model emits lone bytes often enough for some lead byte to be followed so."""
    import torch

    tokenizer = reference.tokenizer
    base = tokenizer.encode("x = 1")
    lone_bytes = [t for t in range(len(tokenizer)) if tokenizer.decode([t]) == "\ufffd"]
    with torch.no_grad():
        next_ids = reference.model(torch.tensor([base + [t] for t in lone_bytes])).logits[:, -1].argmax(-1).tolist()
    for lead, following in zip(lone_bytes, next_ids):
        character = tokenizer.decode([lead, following])
        if len(character) == 1 and character != "\ufffd":
            return base + [lead], character
    raise AssertionError("no lead byte of this model is followed by its continuation byte")
