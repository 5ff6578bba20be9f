"""Running the canary: every probe through the serving engine, for the candidate and (unless its
answers are cached) the base, greedily and all in flight together so the engine batches them; then
every answer judged and checked for degeneracy, and the gate applied.

An answer stops early once its probe's outcome cannot change, where the judge can tell (the keyword
judge's `settled`: it reads only the answer's head): a harmful probe's once its verdict is fixed, a
benign probe's once it is refused (refused or degenerate is bad either way; an answer's degeneracy
needs all of it). Most harmful probes are refused in their first tokens, so the batch shrinks to the
benign answers after a few steps. The report says how long each phase took."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import aclosing
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from gateway.canary.config import CanaryConfig
from gateway.canary.degenerate import degenerate
from gateway.canary.judges import canary_judges
from gateway.canary.probes import Probe, probe_set_key, select_probes
from gateway.canary.report import Judged, ProbeOutcome, report
from gateway.engines.base import Engine, EngineError, GenerationRequest, RequestRejected
from salora.chat_judge import ChatJudge, JudgeError
from salora.judge import Judge


class CanaryError(Exception):
    """The canary could not run to the end (engine or judge failure): no verdict, the adapter waits."""


Settled = Callable[[str, str], bool | None]  # a judge's `settled(prompt, partial)`


class BaseAnswers(Protocol):
    """Where the base model's probe answers are kept between runs (the registry's database)."""

    def get_base_answers(self, key: str) -> dict[str, str] | None: ...

    def put_base_answers(self, key: str, answers: dict[str, str]) -> None: ...


class CanaryRunner:
    def __init__(self, engine: Engine, config: CanaryConfig, judge: Judge, base_answers: BaseAnswers) -> None:
        self.engine = engine
        self.config = config
        self.probes = select_probes(config)
        self.key = probe_set_key(self.probes, config.max_new_tokens)
        self.harmful_judge, self.benign_judge = canary_judges(config.judge, judge)
        self.default_judge = judge  # also asked wherever an LLM judge decides, for their agreement
        self.base_answers = base_answers
        self.early_stop: dict[str, Settled | None] = {
            "harmful": getattr(self.harmful_judge, "settled", None), "benign": getattr(self.benign_judge, "settled", None)}

    def close(self) -> None:
        for judge in {id(j): j for j in (self.harmful_judge, self.benign_judge)}.values():
            if isinstance(judge, ChatJudge):
                judge.close()

    def cache_key(self, base: str) -> str:
        """The base's answers depend on the base (its id and weight identity), the probe set, and the
        rule that cut them short (the judge that stopped them)."""
        return hashlib.sha256(json.dumps({"base": base, **self.key, "early_stop": self._stop_rules()},
                                         sort_keys=True).encode()).hexdigest()

    def _stop_rules(self) -> dict[str, str | None]:
        judges = {"harmful": self.harmful_judge, "benign": self.benign_judge}
        return {s: None if self.early_stop[s] is None else f"{judges[s].name}:{getattr(judges[s], 'rule', '')}"
                for s in judges}

    async def run(self, adapter: str, base: str) -> dict[str, Any]:
        """The report of `adapter` (loaded in the engine) against the base identified by `base`."""
        clock = time.perf_counter()
        timings: dict[str, float] = {}

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[phase] = round(now - clock, 3)
            clock = now

        key = self.cache_key(base)
        cached = await asyncio.to_thread(self.base_answers.get_base_answers, key)
        lap("base_lookup")
        candidate, base_answers, stopped = await self._answers(adapter, need_base=cached is None)
        lap("generate")
        if cached is None:
            await asyncio.to_thread(self.base_answers.put_base_answers, key, base_answers)
            lap("base_store")
        else:
            base_answers = cached
        missing = [p.id for p in self.probes if p.id not in base_answers]
        if missing:
            raise CanaryError(f"the cached base answers lack probes {missing[:3]}")
        outcomes = await asyncio.to_thread(self._judge_all, candidate, base_answers)
        lap("judge")
        judges = {"harmful": self.harmful_judge.name, "benign": self.benign_judge.name}
        if self.config.judge is not None:
            judges["second_opinion"] = self.default_judge.name
        return {**report(outcomes, self.config, judges, self.key), "base": base, "base_cached": cached is not None,
                "early_stop": {"rules": self._stop_rules(), **stopped}, "timings_s": timings}

    async def _answers(self, adapter: str, need_base: bool) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
        """Greedy answers of the candidate (and of the base when needed), `concurrency` in flight, and
        how many of each were stopped early."""
        limit = asyncio.Semaphore(self.config.concurrency)

        async def answer(probe: Probe, which: str | None) -> tuple[str, bool]:
            settled = self.early_stop[probe.set]
            request = GenerationRequest([{"role": "user", "content": probe.prompt}], adapter=which,
                                        max_tokens=self.config.max_new_tokens, temperature=0, stream=settled is not None)
            text = ""
            async with limit, aclosing(self.engine.generate(request)) as chunks:
                async for chunk in chunks:
                    text += chunk.text
                    if settled is not None and chunk.finish_reason is None and self._decided(settled, probe, text.strip()):
                        return text.strip(), True  # closing the stream ends the row in the engine
            return text.strip(), False

        jobs = [answer(p, adapter) for p in self.probes]
        if need_base:
            jobs += [answer(p, None) for p in self.probes]
        try:
            done = await asyncio.gather(*jobs)
        except (EngineError, RequestRejected) as e:
            raise CanaryError(f"the engine failed a probe: {e}") from e
        n = len(self.probes)
        ids = [p.id for p in self.probes]
        texts = [t for t, _ in done]
        stopped = {"candidate_stopped": sum(s for _, s in done[:n])}
        if need_base:
            stopped["base_stopped"] = sum(s for _, s in done[n:])
        return dict(zip(ids, texts[:n])), dict(zip(ids, texts[n:])), stopped

    @staticmethod
    def _decided(settled: Settled, probe: Probe, partial: str) -> bool:
        """Whether the probe's outcome is fixed by the answer so far: a harmful probe's by either
        verdict, a benign one's only by a refusal (an answer may still turn degenerate)."""
        verdict = settled(probe.prompt, partial)
        return verdict is True or (verdict is False and probe.set == "harmful")

    def _judge_all(self, candidate: dict[str, str], base: dict[str, str]) -> list[ProbeOutcome]:
        """In a worker thread: a judge may be a remote model."""

        def judged(probe: Probe, answer: str) -> Judged:
            judge = self.harmful_judge if probe.set == "harmful" else self.benign_judge
            second = None if judge is self.default_judge else self.default_judge.is_refusal(probe.prompt, answer)
            return Judged(answer, judge.is_refusal(probe.prompt, answer), degenerate(answer), second)

        workers = self.config.judge.concurrency if self.config.judge else 1
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="salora-canary-judge") as pool:
                cand = list(pool.map(lambda p: judged(p, candidate[p.id]), self.probes))
                base_judged = list(pool.map(lambda p: judged(p, base[p.id]), self.probes))
        except JudgeError as e:
            raise CanaryError(str(e)) from e
        return [ProbeOutcome(p, c, b) for p, c, b in zip(self.probes, cand, base_judged)]
