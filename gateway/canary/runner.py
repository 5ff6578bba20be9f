"""Running the canary: every probe through the serving engine, for the candidate and (unless its
answers are cached) the base, greedily and all in flight together so the engine batches them; then
every answer judged and checked for degeneracy, and the gate applied."""

from __future__ import annotations

import asyncio
import hashlib
import json
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

    def close(self) -> None:
        for judge in {id(j): j for j in (self.harmful_judge, self.benign_judge)}.values():
            if isinstance(judge, ChatJudge):
                judge.close()

    def cache_key(self, base: str) -> str:
        """The base's answers depend on the base (its id and weight identity) and the probe set only."""
        return hashlib.sha256(json.dumps({"base": base, **self.key}, sort_keys=True).encode()).hexdigest()

    async def run(self, adapter: str, base: str) -> dict[str, Any]:
        """The report of `adapter` (loaded in the engine) against the base identified by `base`."""
        key = self.cache_key(base)
        cached = await asyncio.to_thread(self.base_answers.get_base_answers, key)
        candidate, base_answers = await self._answers(adapter, need_base=cached is None)
        if cached is None:
            await asyncio.to_thread(self.base_answers.put_base_answers, key, base_answers)
        else:
            base_answers = cached
        missing = [p.id for p in self.probes if p.id not in base_answers]
        if missing:
            raise CanaryError(f"the cached base answers lack probes {missing[:3]}")
        outcomes = await asyncio.to_thread(self._judge_all, candidate, base_answers)
        judges = {"harmful": self.harmful_judge.name, "benign": self.benign_judge.name}
        if self.config.judge is not None:
            judges["second_opinion"] = self.default_judge.name
        return {**report(outcomes, self.config, judges, self.key), "base": base, "base_cached": cached is not None}

    async def _answers(self, adapter: str, need_base: bool) -> tuple[dict[str, str], dict[str, str]]:
        """Greedy answers of the candidate (and of the base when needed), `concurrency` in flight."""
        limit = asyncio.Semaphore(self.config.concurrency)

        async def answer(probe: Probe, which: str | None) -> str:
            request = GenerationRequest([{"role": "user", "content": probe.prompt}], adapter=which,
                                        max_tokens=self.config.max_new_tokens, temperature=0, stream=False)
            async with limit:
                parts = [chunk.text async for chunk in self.engine.generate(request)]
            return "".join(parts).strip()

        jobs = [answer(p, adapter) for p in self.probes]
        if need_base:
            jobs += [answer(p, None) for p in self.probes]
        try:
            texts = await asyncio.gather(*jobs)
        except (EngineError, RequestRejected) as e:
            raise CanaryError(f"the engine failed a probe: {e}") from e
        n = len(self.probes)
        ids = [p.id for p in self.probes]
        return dict(zip(ids, texts[:n])), dict(zip(ids, texts[n:]))

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
