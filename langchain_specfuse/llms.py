"""SpecFuseLLM: the fused ensemble as a LangChain text-completion model (BaseLLM)."""

from __future__ import annotations

import functools
import operator
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from langchain_specfuse._base import SpecFuseParams, result_metadata, usage_metadata
from specfuse import FusionResult, Segment


class SpecFuseLLM(SpecFuseParams, BaseLLM):
    """Several LLMs fused into one completion model (SpecFuse, arXiv 2412.07380).

    A prompt string is sent to each member as one user turn, rendered with that
    member's own chat template (or the plain template for base models).
    Settings, usage counting and metadata are as for `ChatSpecFuse`: each
    Generation's `generation_info` holds `usage_metadata`, `finish_reason`,
    `specfuse_summary`, `specfuse_member_usage` and `specfuse_trace`;
    `llm_output["token_usage"]` sums usage over the prompts of the call.
    Several prompts in one call (`batch`, `generate`) run concurrently through
    the core's `SpecFuse.batch`, unless `streaming=True`, which runs them in turn.
    Streaming yields one GenerationChunk per accepted segment and reports each
    to `on_llm_new_token` (BaseLLM leaves that to the integration).
    """

    llm_type: ClassVar[str] = "specfuse"
    lc_module: ClassVar[str] = "llms"

    def _info(self, result: FusionResult) -> dict[str, Any]:
        return {**result_metadata(result, self.resolved_model_name), "usage_metadata": usage_metadata(result)}

    def _chunk(self, segment: Segment) -> GenerationChunk:
        info = {
            "specfuse_segments": [{"member": segment.member, "round": segment.round, "text": segment.text}]
        }
        if segment.result is not None:
            info.update(self._info(segment.result))
        return GenerationChunk(text=segment.text, generation_info=info)

    def _batch_result(self, results: list[FusionResult]) -> LLMResult:
        return self._llm_result([[Generation(text=r.text, generation_info=self._info(r))] for r in results])

    @staticmethod
    def _joined(chunks: list[GenerationChunk]) -> list[Generation]:
        """A streamed prompt's chunks as the one Generation a call without streaming gives it."""
        assert chunks  # the engine always yields a last segment
        final = functools.reduce(operator.add, chunks)
        return [Generation(text=final.text, generation_info=final.generation_info)]

    def _llm_result(self, generations: list[list[Generation]]) -> LLMResult:
        totals = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for gens in generations:
            usage = (gens[0].generation_info or {}).get("usage_metadata") or {}
            for key in totals:
                totals[key] += int(usage.get(key, 0))
        return LLMResult(
            generations=generations,
            llm_output={"token_usage": totals, "model_name": self.resolved_model_name},
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if not self.streaming:
            # All prompts at once, as the async path does: their rounds interleave on the members.
            return self._batch_result(self.engine.batch(prompts, **self._overrides(stop, kwargs)))
        return self._llm_result(
            [self._joined(list(self._stream(prompt, stop, run_manager, **kwargs))) for prompt in prompts]
        )

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if not self.streaming:
            return self._batch_result(await self.engine.abatch(prompts, **self._overrides(stop, kwargs)))
        return self._llm_result(
            [
                self._joined([chunk async for chunk in self._astream(prompt, stop, run_manager, **kwargs)])
                for prompt in prompts
            ]
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for segment in self.engine.stream(prompt, **self._overrides(stop, kwargs)):
            chunk = self._chunk(segment)
            # BaseLLM.stream() passes its run_manager and expects the integration to report tokens.
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for segment in self.engine.astream(prompt, **self._overrides(stop, kwargs)):
            chunk = self._chunk(segment)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
