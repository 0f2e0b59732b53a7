"""lm-eval's requests, built and tokenized once per worker; per candidate, answers in and metrics out.

`PreparedRequests` asks each lm-eval Task to build its requests for the fixed doc subset (few-shot
contexts, chat template, system instruction: lm-eval's own code) and tokenizes them with lm-eval's
own HFLM tokenization (`_encode_pair`, rolling windows, the left truncation of generation prompts),
once. Per candidate, `score` hands the token ids to a `ScoringBackend`, puts its answers where
lm-eval's `evaluate` would (`Instance.resps`), and runs lm-eval's filters, `process_results` and
aggregation, so every metric is lm-eval's own.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import UserError
from evomerge.evaluation.backend import SCORED_OUTPUT_TYPES, GenerationRequest, ScoringBackend, TokenPair
from evomerge.evaluation.seeding import FEWSHOT_SEED, seeded_global_rngs

# The per-doc renderings lm-eval's process_results asks for.
DOC_FIELDS = ("doc_to_text", "doc_to_target", "doc_to_choice")


@dataclass(frozen=True)
class PromptOptions:
    """How lm-eval renders prompts: its `evaluate` arguments of the same names."""

    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False


@dataclass(frozen=True)
class TaskMetrics:
    """One task's aggregated results, keyed as lm-eval keys them ("acc,none")."""

    values: dict[str, float]
    n_docs: int


@dataclass
class PreparedTask:
    """A task whose instances are built: the docs in lm-eval's order and each doc's instances."""

    name: str
    task: Any  # lm-eval Task
    docs: list[tuple[int, dict]]
    instances_by_doc: dict[int, list[Any]] = field(default_factory=dict)


class PreparedRequests:
    """Every request of a set of tasks, as lm-eval Instances and as token ids."""

    def __init__(self, tasks: dict[str, Any], lm, samples: dict[str, list[int]], options: PromptOptions):
        """`lm` is lm-eval's HFLM over the scored model: its tokenization and chat template are used.

        `samples` maps a task to the doc indices to score; a task missing from it scores every doc.
        """
        self.tasks = [_build_task(name, task, lm, samples.get(name), options) for name, task in tasks.items()]
        instances = [instance for prepared in self.tasks for instance in prepared.task.instances]
        self._pair_instances = [i for i in instances if i.request_type == "loglikelihood"]
        self._rolling_instances = [i for i in instances if i.request_type == "loglikelihood_rolling"]
        self._generation_instances = [i for i in instances if i.request_type == "generate_until"]
        self.pairs = tuple(_tokenize_pair(lm, *instance.args) for instance in self._pair_instances)
        self.rolling = tuple(_rolling_windows(lm, instance.args[0]) for instance in self._rolling_instances)
        self.generations = tuple(_generation_request(lm, instance) for instance in self._generation_instances)

    def score(self, backend: ScoringBackend, device) -> dict[str, TaskMetrics]:
        """Run the backend on every request and return lm-eval's metrics per task."""
        answers: list[tuple[list[Any], list[Any]]] = []
        if self.pairs:
            found = backend.loglikelihood(self.pairs)
            answers.append((self._pair_instances, [(answer.logprob, answer.is_greedy) for answer in found]))
        if self.rolling:
            answers.append((self._rolling_instances, backend.loglikelihood_rolling(self.rolling)))
        if self.generations:
            answers.append((self._generation_instances, backend.generate_until(self.generations)))
        for instances, responses in answers:
            for instance, response in zip(instances, responses, strict=True):
                # lm-eval asks `repeats` times; greedy answers are the same every time.
                instance.resps = [response] * instance.repeats
                instance.filtered_resps = {}
        # Filters and metrics may draw random numbers: seeded as lm-eval seeds its evaluate().
        with seeded_global_rngs(device):
            return {prepared.name: _task_metrics(prepared) for prepared in self.tasks}


def _build_task(name: str, task, lm, samples: list[int] | None, options: PromptOptions) -> PreparedTask:
    output_type = task.OUTPUT_TYPE
    if output_type not in SCORED_OUTPUT_TYPES:
        raise UserError(
            f"task '{name}': output_type '{output_type}' is not supported by evaluation.backend native; "
            "set evaluation.backend: lm_eval"
        )
    task.set_fewshot_seed(FEWSHOT_SEED)
    with seeded_global_rngs(lm.device):
        task.build_all_requests(
            samples=samples,
            system_instruction=options.system_instruction,
            apply_chat_template=options.apply_chat_template,
            fewshot_as_multiturn=options.fewshot_as_multiturn,
            chat_template=lm.apply_chat_template if options.apply_chat_template else None,
            tokenizer_name=lm.tokenizer_name if options.apply_chat_template else "",
        )
    prepared = PreparedTask(name, task, list(task.doc_iterator(rank=0, limit=None, world_size=1, samples=samples)))
    _remember_doc_fields(task, [doc for _, doc in prepared.docs])
    for instance in task.instances:
        prepared.instances_by_doc.setdefault(instance.doc_id, []).append(instance)
    for doc_instances in prepared.instances_by_doc.values():
        doc_instances.sort(key=lambda instance: instance.idx)
    return prepared


def _remember_doc_fields(task, docs: list[dict]) -> None:
    """Render each scored doc's text, target and choices once, not on every candidate.

    `process_results` asks for them again per doc and candidate, and lm-eval compiles their Jinja
    template on every call: half of a small generate_until task's scoring time. They are pure
    functions of the doc, so this task object (built for this evaluator alone) answers from a memo
    for these docs, which are the very dicts `score` passes, and asks lm-eval for anything else.
    """
    scored = {id(doc) for doc in docs}
    for name in DOC_FIELDS:
        render = getattr(task, name)
        memo: dict[int, Any] = {}

        def remembered(doc, *args, _render=render, _memo=memo, **kwargs):
            if args or kwargs or id(doc) not in scored:
                return _render(doc, *args, **kwargs)
            if id(doc) not in _memo:
                _memo[id(doc)] = _render(doc)
            return _memo[id(doc)]

        setattr(task, name, remembered)


def _task_metrics(prepared: PreparedTask) -> TaskMetrics:
    """lm-eval's per-doc `process_results` under each filter, then the task's aggregation."""
    from lm_eval.api.metrics import mean

    task = prepared.task
    task.apply_filters()
    per_doc: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for filter_key in task.instances[0].filtered_resps:
        for doc_id, doc in prepared.docs:
            results = [instance.filtered_resps[filter_key] for instance in prepared.instances_by_doc[doc_id]]
            for metric, value in task.process_results(doc, results).items():
                per_doc[(metric, filter_key)].append(value)
    aggregations = task.aggregation()
    values = {
        f"{metric},{key}": float(aggregations.get(metric, mean)(items)) for (metric, key), items in per_doc.items()
    }
    return TaskMetrics(values, len(prepared.docs))


def _tokenize_pair(lm, context: str, continuation: str) -> TokenPair:
    """lm-eval's TemplateLM.loglikelihood tokenization of one (context, continuation) request."""
    if context == "":
        continuation_tokens = lm.tok_encode(continuation, add_special_tokens=False)
        if lm.prefix_token_id != continuation_tokens[0]:
            return TokenPair((lm.prefix_token_id,), tuple(continuation_tokens))
        return TokenPair(tuple(continuation_tokens[:1]), tuple(continuation_tokens[1:]))
    context_tokens, continuation_tokens = lm._encode_pair(context, continuation)
    return TokenPair(tuple(context_tokens), tuple(continuation_tokens))


def _rolling_windows(lm, text: str) -> tuple[TokenPair, ...]:
    """lm-eval's HFLM.loglikelihood_rolling windows of one document."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(
        token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1
    )
    return tuple(TokenPair(tuple(context), tuple(target)) for context, target in map(make_disjoint_window, windows))


def _generation_request(lm, instance) -> GenerationRequest:
    """lm-eval's HFLM.generate_until handling of one request's kwargs and prompt."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    context, gen_kwargs = instance.args
    kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
    until = handle_stop_sequences(
        kwargs.pop("until", None), eos=lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    )
    max_gen_toks = kwargs.pop("max_gen_toks")
    if kwargs.get("do_sample"):
        raise UserError(
            f"task '{instance.task_name}': generation_kwargs.do_sample is true; a score must be greedy: "
            "set do_sample: false in the task's gen_kwargs"
        )
    if "max_length" in kwargs:
        raise UserError(f"task '{instance.task_name}': generation_kwargs.max_length: use max_gen_toks instead")
    # lm-eval drops a zero temperature when decoding greedily, so HF does not warn about it.
    if kwargs.get("temperature") == 0.0:
        kwargs.pop("temperature")
    prompt_ids, _ = lm.tok_batch_encode(
        [context], left_truncate_len=lm.max_length - max_gen_toks, truncation=lm.truncation
    )
    return GenerationRequest(
        context=tuple(prompt_ids[0].tolist()),
        until=tuple(until),
        max_gen_toks=max_gen_toks,
        generate_kwargs=tuple(sorted(kwargs.items())),
    )
