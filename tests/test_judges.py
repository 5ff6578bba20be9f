"""The judges without a model: agreement and Cohen's kappa on known verdicts, the `--judge` spec,
and `salora eval` stopping with one line, before any generation, when the LLM judge is unusable."""

from __future__ import annotations

import random
import socket

import httpx
import pytest

from salora.chat_judge import ChatJudge, JudgeError, parse_judge
from salora.datasets import write_jsonl
from salora.errors import SaLoRAError
from salora.judge import HEAD_CHARS, REFUSAL_PHRASES, KeywordJudge, agreement
from salora_cli.main import main


def _substring_verdict(response: str, phrases: tuple[str, ...] = REFUSAL_PHRASES) -> bool:
    """The keyword judge's definition: a phrase occurs in the lowered head (what its regex must give)."""
    head = response[:HEAD_CHARS].lower().replace("\u2019", "'")
    return any(phrase in head for phrase in phrases)


def test_the_keyword_judge_gives_the_substring_verdict():
    rng, judge, refusals = random.Random(22), KeywordJudge(), 0
    letters = "iam'sorynotblecdgvwhpt \u2019IAMC"
    for _ in range(20_000):
        parts = [rng.choice(REFUSAL_PHRASES) if rng.random() < 0.1 else
                 "".join(rng.choice(letters) for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(0, 12))]
        text = "".join(part.upper() if rng.random() < 0.2 else part for part in parts)
        assert judge.is_refusal("", text) == _substring_verdict(text), text
        refusals += _substring_verdict(text)
    assert 2_000 < refusals < 18_000  # both verdicts well covered
    assert judge.is_refusal("", "x" * (HEAD_CHARS - 3) + "i cannot") is False  # past the head


@pytest.mark.parametrize("phrases", [(), ("",), ("ab", "abc"), ("abc", "ab"), ("a.b", "a*", "(")])
def test_the_keyword_judge_with_other_phrases(phrases):
    judge = KeywordJudge(phrases)
    for text in ("", "ab", "abc", "a.b", "axb", "a*", "aa", "(", "\n"):
        assert judge.is_refusal("", text) == _substring_verdict(text, phrases), text


@pytest.mark.parametrize(("a", "b", "fraction", "kappa"), [
    ([True, True, False, False], [True, False, False, False], 0.75, 0.5),  # chance 0.5: (0.75 - 0.5) / 0.5
    ([True, False], [False, True], 0.0, -1.0),
    ([True, False, True], [True, False, True], 1.0, 1.0),
    ([True, True], [True, True], 1.0, None),  # one verdict throughout: kappa undefined
    ([True, True], [False, False], 0.0, 0.0),
])
def test_agreement(a, b, fraction, kappa):
    result = agreement(a, b)
    assert result["fraction"] == fraction
    assert result["cohen_kappa"] == (None if kappa is None else pytest.approx(kappa))


def test_agreement_needs_paired_verdicts():
    with pytest.raises(ValueError):
        agreement([True], [True, False])
    with pytest.raises(ValueError):
        agreement([], [])


def test_judge_spec(monkeypatch):
    assert isinstance(parse_judge("keyword"), KeywordJudge)
    monkeypatch.setenv("SALORA_JUDGE_API_KEY", "secret")
    judge = parse_judge("openai:http://127.0.0.1:8000/v1/#meta-llama/Llama-Guard-3-1B", "guard", constrain=True)
    assert isinstance(judge, ChatJudge) and judge.name == "guard:meta-llama/Llama-Guard-3-1B"
    assert (judge.url, judge.constrain) == ("http://127.0.0.1:8000/v1", True)
    assert judge._http.headers["authorization"] == "Bearer secret"
    for bad in ("openai:http://h/v1", "openai:#m", "vllm:http://h/v1#m", "openai:ftp://h#m", "llama-guard"):
        with pytest.raises(SaLoRAError, match="expected `keyword` or `openai:<base-url>#<model>`"):
            parse_judge(bad)
    with pytest.raises(SaLoRAError, match="need an LLM judge"):
        parse_judge("keyword", "guard")
    with pytest.raises(SaLoRAError, match="need an LLM judge"):
        parse_judge("keyword", constrain=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_eval_with_an_unreachable_judge_is_one_line_and_writes_nothing(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": "Name three colours."}], prompts)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", "embedded", "--prompts", str(prompts), "--out", str(out),
               "--judge", f"openai:http://127.0.0.1:{closed_port()}/v1#judge"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("salora eval: error: the judge at http://127.0.0.1:")
    assert "ConnectError" in err


def test_eval_refuses_judge_options_without_an_llm_judge(tmp_path, capsys):
    rc = main(["eval", "--model", "embedded", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o.json"),
               "--judge-style", "guard"])
    assert rc == 2 and "need an LLM judge" in capsys.readouterr().err


def test_the_check_names_a_model_the_endpoint_does_not_serve():
    listing = httpx.MockTransport(lambda r: httpx.Response(200, json={"data": [{"id": "other-model"}]}))
    with pytest.raises(JudgeError, match=r"does not serve 'judge' \(it serves \['other-model'\]\)"):
        ChatJudge("http://j/v1", "judge", transport=listing).check()
    ChatJudge("http://j/v1", "other-model", transport=listing).check()  # served: no error


@pytest.mark.parametrize("answer", [
    "I'm sorry, but I can't help with that.",
    "  \n I cannot do that. " + "Here is why. " * 30,
    "Sure, here is a plan: " + "step after step, " * 20,
    "Baking bread takes time. " * 9 + "I can't stress enough how good it is.",  # the phrase past the head
    "x" * 236 + " I cannot",  # a phrase that the head's end cuts
    "Short answer.",
    "I can\u2019t share that.",  # a typographic apostrophe
])
def test_the_keyword_judges_settled_verdict_is_its_final_verdict(answer):
    """Wherever `settled` gives a verdict on the answer so far, it is the verdict on the whole answer:
    what lets the canary stop decoding there."""
    judge = KeywordJudge()
    final = judge.is_refusal("", answer.strip())
    verdicts = [judge.settled("", answer[:k].strip()) for k in range(len(answer) + 1)]
    assert {v for v in verdicts if v is not None} <= {final}
    assert verdicts[-1] == final or (verdicts[-1] is None and len(answer.strip()) < judge.head_chars)


def test_the_keyword_judge_settles_as_soon_as_the_head_decides():
    judge = KeywordJudge()
    assert judge.settled("", "I'm sorry") is True
    assert judge.settled("", "x" * 239) is None
    assert judge.settled("", "x" * 240) is False
    assert KeywordJudge(head_chars=10).rule != judge.rule != KeywordJudge(phrases=("nope",)).rule
