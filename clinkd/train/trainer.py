"""``ClinKDTrainer``: a transformers ``Trainer`` whose loss is ClinKD's, on the fused kernels.

Per batch (both stages):

    hidden  = the student's final hidden states [B,S,Hd] (its forward, with logits for one position only)
    rows, y = next_token_targets(labels)                 supervised next-token rows and their targets
    loss    = linear_kd_loss(hidden[rows], lm_head.weight, y, ...)     no [tokens × vocab] logits

SFT stage: alpha = 0, beta = 1 (cross-entropy only). KD stage: the teacher's pseudo-labels at the same
rows — from the store (``PseudoLabelStore``, looked up by the batch's ``sample_index``) or from an
online teacher (eval mode, no gradients; top-k pseudo-labels, or its dense distribution when topk is
None) — with temperature, alpha, beta, optional T², and the confidence-margin curriculum weights
(``clinkd.train.curriculum``) as ``token_weights`` (none once its warm-up is over: every token counts,
and the dense online teacher then skips the extra lm_head pass its margins need). The curriculum ranks
the tokens of each micro-batch on its own process (so its fraction holds per rank). The loss runs inside
the student's lm_head forward (``clinkd.patch.call_in_forward``), where DeepSpeed ZeRO-3 and FSDP2 hand
out the full weight and take its gradient back. Everything else (optimizer, schedule,
accumulation, mixed precision, checkpoints, resume, logging, accelerate/DeepSpeed) is Trainer's; the
loss is a per-micro-batch mean, which Trainer divides by the accumulation steps. Logged besides
``loss``: ``kd_loss`` and ``ce_loss`` (means over the micro-batches since the last log) and
``kd_fraction`` (the curriculum's current fraction). The model may be a ``peft.PeftModel`` (a LoRA stage,
``clinkd.train.lora``): its forward runs the adapters, the loss reads the frozen lm_head of the model inside.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import PreTrainedModel, Trainer

from clinkd_kernels.loss import linear_kd_loss
from clinkd_kernels.topk import PseudoLabels

from ..data.collate import model_inputs
from ..distill.cache import head_pseudo_labels, teacher_rows
from ..distill.store import PseudoLabelStore, StoreError
from .artifacts import hub_renamings
from .lora import base_of
from .released import released_linear_kd_loss
from .specs import KDSettings  # the KD term a KD stage gives the trainer


class ClinKDTrainer(Trainer):
    """Trainer with the ClinKD loss (see the module docstring).

    Extra keyword arguments:
        kd: KDSettings for a KD stage; None for SFT (cross-entropy only).
        teacher: an online teacher model (``*ForConditionalGeneration``), or
        store: a ``PseudoLabelStore`` (its rows are checked against the batch's targets);
        sample_ids: sample index → store id (default: ``train_dataset.ids``).
        kernel_backend: ``backend=`` for the clinkd kernels (None: by device).
    The data collator must give ``sample_index`` (``Qwen2VLCollator`` does); ``remove_unused_columns``
    is turned off so it reaches the loss.
    """

    def __init__(
        self,
        *args,
        kd: KDSettings | None = None,
        teacher=None,
        store: PseudoLabelStore | None = None,
        sample_ids: list[str] | None = None,
        kernel_backend: str | None = None,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        self._hub_renamings = hub_renamings(model) if isinstance(model, PreTrainedModel) else None
        super().__init__(*args, **kwargs)
        self._check_engine()
        self.args.remove_unused_columns = False
        if kd is not None and (teacher is None) == (store is None):
            raise ValueError("a KD stage needs exactly one of teacher= (online) or store= (pseudo-label store)")
        if kd is not None and store is not None and kd.topk is None:
            raise ValueError("a pseudo-label store holds top-k labels: kd.topk must be set (its k)")
        if store is not None and kd.topk != store.meta.k:
            raise StoreError(
                f"pseudo-label store {store.folder} holds k={store.meta.k} labels per token, the KD "
                f"stage asks for topk={kd.topk}"
            )
        self.kd, self.store, self.kernel_backend = kd, store, kernel_backend
        self.teacher = teacher
        self._teacher_ready = False
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if not self.is_deepspeed_enabled:  # DeepSpeed places (and partitions) it at the first step
                teacher.to(self.args.device)
        if sample_ids is None and store is not None:
            sample_ids = getattr(self.train_dataset, "ids", None)
            if sample_ids is None:
                raise ValueError("store= needs sample_ids= (or a train_dataset with .ids)")
        self.sample_ids = sample_ids
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self.model_accepts_loss_kwargs = False
        self._parts = {"kd": 0.0, "ce": 0.0, "n": 0}

    def _check_engine(self) -> None:
        """The engine asked for (``deepspeed=``/``fsdp=`` or accelerate's launch config) is the one set up:
        on CPUs accelerate turns FSDP into DDP (unless clinkd train set the state up),
        and DeepSpeed into plain processes when the state was made without it — a run would then train,
        silently, with another engine. Launched processes that accelerate does not count as one group
        would each train on all the data: refused too."""
        import os

        asked = {
            "DeepSpeed": bool(self.args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true",
            "FSDP": bool(self.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP") == "true",
        }
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes != launched:
            raise RuntimeError(
                f"launched as {launched} processes (WORLD_SIZE), but accelerate counts "
                f"{self.accelerator.num_processes}: each process would train on all the data (DeepSpeed "
                "without GPUs in the state transformers makes, say); run it through clinkd train, which sets "
                "the process state up"
            )
        got = {"DeepSpeed": self.is_deepspeed_enabled, "FSDP": self.is_fsdp_enabled}
        for engine, wanted in asked.items():
            if wanted and not got[engine]:
                kind = getattr(
                    self.accelerator.state.distributed_type, "value", self.accelerator.state.distributed_type
                )
                raise RuntimeError(
                    f"{engine} was asked for, but accelerate set up {kind} (on CPUs clinkd train sets FSDP "
                    "up itself; DeepSpeed needs its config in the training arguments before anything else starts)"
                )

    # ------------------------------------------------------------------ teacher side

    def _ready_teacher(self):
        """The online teacher, placed by ``_prepare_teacher`` at its first use."""
        if not self._teacher_ready:
            self._prepare_teacher()
        return self.teacher

    def _prepare_teacher(self) -> None:
        """Under DeepSpeed the online teacher gets an inference engine of its own, from the student's
        finished config (so after Trainer filled its "auto" values): partitioned like the student under
        ZeRO-3, a plain replica otherwise (stage 0: there are no gradients or optimizer states to shard);
        no optimizer, no gradients. Elsewhere (DDP, FSDP2, one process) it stays a replica on the device."""
        self._teacher_ready = True
        if not self.is_deepspeed_enabled or self.teacher is None:
            return
        import copy

        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        zero = dict(config.get("zero_optimization", {}))
        if zero.get("stage") != 3:
            zero = {"stage": 0}
        config["zero_optimization"] = zero
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        self.teacher, *_ = deepspeed.initialize(model=self.teacher, config=config)
        self.teacher.eval()

    def _pseudo_labels(
        self, inputs: dict, rows: torch.Tensor, targets: torch.Tensor, vocab: int, device
    ) -> PseudoLabels:
        kd = self.kd
        if self.store is not None:
            index = inputs.get("sample_index")
            if index is None:
                raise ValueError("a batch for the store needs sample_index (use clinkd's Qwen2VLCollator)")
            ids = [self.sample_ids[int(i)] for i in index.tolist()]
            labels, stored_targets = self.store.batch(ids)
            if stored_targets.shape != targets.shape or not torch.equal(
                stored_targets.to(targets.device).long(), targets
            ):
                raise StoreError(
                    f"pseudo-label store {self.store.folder} does not match the tokens of samples "
                    f"{ids[:4]}{'...' if len(ids) > 4 else ''}: the data, tokenizer or max_length "
                    "changed since it was built; rebuild it"
                )
            return labels.to(device)
        with torch.no_grad():
            hidden, head = teacher_rows(self._ready_teacher(), inputs, rows, vocab)
            return head_pseudo_labels(
                head, hidden, k=kd.topk, temperature=kd.temperature, vocab_size=vocab, backend=self.kernel_backend
            ).to(device)

    @torch.no_grad()
    def _dense_teacher(self, inputs: dict, rows: torch.Tensor, vocab: int, *, margins: bool):
        """Online dense teacher: (teacher hidden [N, Hd_t], its lm_head module, margins [N] or None). The
        margins cost one more pass over the teacher's lm_head (chunked): only with ``margins``."""
        selected, head = teacher_rows(self._ready_teacher(), inputs, rows, vocab)
        if not margins:
            return selected, head, None
        top2 = head_pseudo_labels(
            head,
            selected,
            k=min(2, vocab),
            temperature=self.kd.temperature,
            vocab_size=vocab,
            backend=self.kernel_backend,
        )
        return selected, head, top2.margin

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from clinkd.patch import lm_head_operands, next_token_targets
        from clinkd.patch.head import call_in_forward, check_full_weight

        inputs = dict(inputs)
        labels = inputs.pop("labels")
        student = base_of(self.accelerator.unwrap_model(model))  # a LoRA student: the model inside the PeftModel
        forward_inputs = model_inputs(student, inputs)
        # Through the (possibly wrapped) model's forward, so DDP sees the parameters used; logits for
        # one position only: the loss computes the rest chunk by chunk.
        forward_inputs.update(output_hidden_states=True, logits_to_keep=1, use_cache=False)
        outputs = model(**forward_inputs)
        hidden = outputs.hidden_states[-1]
        rows, targets = next_token_targets(labels)
        rows, targets = rows.to(hidden.device), targets.to(hidden.device)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        head = student.get_output_embeddings()
        vocab = head.out_features

        teacher_kw, weights, t_head = {}, None, None
        if self.kd is not None:
            kd = self.kd
            # After its warm-up the curriculum keeps every token (weight 1): no margins, no weights.
            ranking = kd.curriculum is not None and kd.curriculum.fraction(self.state.global_step) < 1.0
            if kd.topk is None:
                t_hidden, t_head, margin = self._dense_teacher(inputs, rows, vocab, margins=ranking)
                teacher_kw = dict(teacher_hidden=t_hidden)
            else:
                pseudo = self._pseudo_labels(inputs, rows, targets, vocab, hidden.device)
                margin = pseudo.margin
                teacher_kw = dict(teacher=pseudo)
            if ranking:
                weights = kd.curriculum.weights(margin, self.state.global_step).to(hidden.device)

        def loss_in_head(head, selected):
            """The loss, run as the student's lm_head forward (clinkd.patch.call_in_forward): an engine
            that shards the head hands it the full weight and takes its gradient back."""
            selected, weight, bias = lm_head_operands(selected, head)
            common = dict(bias=bias, return_components=True, backend=self.kernel_backend)
            if self.kd is None:
                return linear_kd_loss(selected, weight, targets, alpha=0.0, beta=1.0, **common)
            if t_head is not None:  # the dense teacher's head, read inside its own forward too
                return call_in_forward(t_head, lambda t, s: kd_terms(s, weight, common, t.weight, t.bias), selected)
            return kd_terms(selected, weight, common)

        def kd_terms(selected, weight, common, t_weight=None, t_bias=None):
            kd = self.kd
            extra = dict(teacher_kw)
            if t_weight is not None:
                check_full_weight(t_weight, "the teacher's lm_head.weight")
                extra.update(teacher_weight=t_weight, teacher_bias=t_bias)
            args = dict(temperature=kd.temperature, alpha=kd.alpha, token_weights=weights, **extra, **common)
            if kd.form == "released":
                return released_linear_kd_loss(selected, weight, targets, kd_only=kd.beta == 0, **args)
            return linear_kd_loss(selected, weight, targets, beta=kd.beta, t2_scale=kd.t2_scale, **args)

        loss, kd_part, ce_part = call_in_forward(head, loss_in_head, selected)
        if model.training:  # summed on the device: read once per log, not synced every micro-batch
            self._parts["kd"] = self._parts["kd"] + kd_part.detach().double()
            self._parts["ce"] = self._parts["ce"] + ce_part.detach().double()
            self._parts["n"] += 1
        return (loss, {"loss": loss}) if return_outputs else loss

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial):
        """Checkpoints keep the model's own parameter names. ``save_pretrained`` otherwise writes the
        hub layout (for Qwen2-VL: other key names), which Trainer's resume loads with strict=False,
        silently missing every weight; ``final`` folders (``save_model``) keep the hub layout."""
        target = self.accelerator.unwrap_model(self.model)
        original = target.save_pretrained
        if "save_original_format" in inspect.signature(original).parameters:
            target.save_pretrained = functools.partial(original, save_original_format=False)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            target.__dict__.pop("save_pretrained", None)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """``final`` folders: the whole model (FSDP's shards gathered whatever the checkpoints'
        state_dict_type: a sharded one would make transformers write nothing), in the hub layout whatever
        layout or engine the student was loaded with. transformers writes a model in the reverse of the
        renamings it recorded when loading it; loaded under ZeRO-3 it also records a prefix change whose
        reverse writes every text weight under ``model.model.``, and under FSDP2 (another class) it finds
        no renamings at all. The renamings of the model built from its config, taken before any engine
        wrapped it, are used instead."""
        if self.is_fsdp_enabled and not _internal_call:
            self.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        target = self.accelerator.unwrap_model(self.model)
        if not isinstance(target, PreTrainedModel):  # a LoRA stage's PeftModel saves its adapters
            return super().save_model(output_dir, _internal_call=_internal_call)
        recorded = target.__dict__.get("_weight_conversions")
        target._weight_conversions = self._hub_renamings
        try:
            return super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            target._weight_conversions = recorded

    def _issue_warnings_after_load(self, load_result) -> None:
        """Resuming must restore every weight: a missing (untied) or unexpected key is an error."""
        state = self.accelerator.unwrap_model(self.model).state_dict()
        loaded = {state[k].data_ptr() for k in state if k not in set(load_result.missing_keys)}
        missing = [k for k in load_result.missing_keys if k in state and state[k].data_ptr() not in loaded]
        if missing or load_result.unexpected_keys:
            raise RuntimeError(
                f"the checkpoint does not match the model: missing {missing[:5]}, unexpected "
                f"{list(load_result.unexpected_keys)[:5]} (written by another model or layout?)"
            )
        super()._issue_warnings_after_load(load_result)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Adds ``kd_loss`` and ``ce_loss``: means over the micro-batches since the last log, and over the
        processes (Trainer calls ``log`` on every process: the mean is one all-reduce per log)."""
        if "loss" in logs and self._parts["n"]:
            parts = torch.stack([torch.as_tensor(self._parts[k], dtype=torch.float64) for k in ("kd", "ce")])
            parts = parts.to(self.args.device) / self._parts["n"]
            if self.accelerator.num_processes > 1:
                parts = self.accelerator.reduce(parts, reduction="mean")
            kd_mean, ce_mean = parts.tolist()
            if self.kd is not None:
                logs["kd_loss"] = kd_mean
                if self.kd.curriculum is not None:
                    logs["kd_fraction"] = self.kd.curriculum.fraction(self.state.global_step)
            logs["ce_loss"] = ce_mean
            self._parts = {"kd": 0.0, "ce": 0.0, "n": 0}
        super().log(logs, start_time)
