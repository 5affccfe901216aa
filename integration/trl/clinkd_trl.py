"""clinkd's fused loss inside TRL 1.16's own trainers.

Two subclasses that change only the loss, nothing else of the trainer (data, generation, logging,
optimiser, schedule, checkpoints stay TRL's):

* ``ClinkdDistillationTrainer`` — TRL's ``DistillationTrainer`` (on-policy distillation: the student
  samples the completions, the teacher scores them) whose loss is ``clinkd_kernels.linear_kd_loss`` on
  the student's and the teacher's final hidden states and lm_head weights, instead of TRL's
  ``ChunkedDivergenceFunction``. With ``DistillationConfig(beta=0.0)`` both are the forward KL
  KL(teacher ‖ student) at the config's temperature, summed over the completion tokens and divided by
  their count (``num_items_in_batch``), no T² factor. Other betas (reverse KL, JSD) have no clinkd form:
  refused. The student's generation also suppresses the video placeholder id (TRL suppresses the
  image one only), see ``_suppress_placeholders``.
* ``ClinkdLossSFTTrainer`` — TRL's ``SFTTrainer`` whose loss is the model's own forward with labels,
  i.e. clinkd's fused cross-entropy (``linear_kd_loss`` with alpha=0) when the model is patched. Plain
  ``SFTTrainer`` never calls the model's forward in training: it installs its own fused lm_head
  (``trl.trainer.utils.add_fused_lm_head``) that runs the backbone and TRL's chunked log-probabilities,
  so a patched model gets clinkd's positions and attention there but TRL's loss. This subclass is for
  runs that want clinkd's loss kernel; it logs no ``entropy`` / ``mean_token_accuracy`` (no logits are
  made to compute them from).

Both need the model patched first (``clinkd.apply_to_transformers(...)`` before the model is built, or
``clinkd.patch_qwen2_vl(model)``); the distillation loss itself works on any model whose lm_head is a
plain linear layer without logit scaling or soft-capping (checked).
"""

from __future__ import annotations

import torch
from trl import DistillationTrainer, SFTTrainer

import clinkd_kernels
from clinkd.patch import call_in_forward, lm_head_operands

# The multimodal fields DistillationTrainer carries from generation to the loss (its _compute_loss reads
# the same list).
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# Logit post-processing some families apply before the softmax; linear_kd_loss has none of it.
_LOGIT_TRANSFORMS = (
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
    "final_logit_softcapping",
)


def _check_plain_head(model, role: str) -> None:
    config = model.config.get_text_config()
    found = {name: getattr(config, name) for name in _LOGIT_TRANSFORMS if getattr(config, name, None) is not None}
    if found:
        raise ValueError(
            f"the {role}'s config transforms its logits ({found}); clinkd's linear_kd_loss takes plain "
            "lm_head logits: use DistillationTrainer's own loss for this model"
        )


class ClinkdDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` with the loss computed by ``clinkd_kernels.linear_kd_loss``.

    Per completion token i (rows with completion_mask 1; prompt and padding rows have no loss), with
    z_s, z_t the student's and teacher's lm_head logits of the position that predicts token i and
    T = ``args.temperature``:

        loss = Σ_i KL(softmax(z_t,i / T) ‖ softmax(z_s,i / T)) / num_items_in_batch

    which is DistillationTrainer's generalized JSD at beta = 0. ``linear_kd_loss`` drops the rows
    labelled -100 before the lm_head and never makes the [tokens × vocab] logits of the batch.
    The ``entropy`` metric TRL logs from its own kernel is not computed (logged as None).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            raise ValueError(
                f"ClinkdDistillationTrainer computes the forward KL (DistillationConfig(beta=0.0)); "
                f"beta={self.beta} (reverse KL / JSD) has no clinkd kernel: use DistillationTrainer"
            )
        if self.teacher_model is None:
            raise ValueError("ClinkdDistillationTrainer needs a teacher_model")
        _check_plain_head(self.accelerator.unwrap_model(self.model), "student")
        _check_plain_head(self.accelerator.unwrap_model(self.teacher_model), "teacher")
        if self._is_vlm:
            self._suppress_placeholders()

    def _suppress_placeholders(self) -> None:
        """Keep the student from sampling image/video placeholder ids. TRL suppresses the image
        placeholder only; a sampled video placeholder makes a video run without a video, which stock
        transformers trains on as text (its mm_token_type_ids say 0 there) and clinkd's position index
        refuses (ValueError: input_ids has 1 video runs but video_grid_thw has 0 rows)."""
        config = self.accelerator.unwrap_model(self.model).config
        wanted = [getattr(config, key, None) for key in ("image_token_id", "video_token_id")]
        suppress = list(self.generation_kwargs.get("suppress_tokens") or [])
        suppress += [t for t in wanted if t is not None and t not in suppress]
        self.generation_kwargs["suppress_tokens"] = suppress
        self.generation_config.suppress_tokens = suppress

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = completion_ids.size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        # Hidden states at the positions that predict the completion tokens, [B, K, H], by TRL's own helper
        # (the backbone of the model: vision tower and decoder, clinkd's positions and attention when patched).
        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal
        )
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                logits_to_keep,
                **multimodal,
            )

        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        labels = completion_ids.masked_fill(loss_mask == 0, -100).reshape(-1).to(student_head.weight.device)
        student_rows = student_hidden.reshape(-1, student_hidden.size(-1)).to(student_head.weight.device)
        teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.size(-1)).to(student_head.weight.device)

        def head_loss(head, rows):  # run as the student head's forward, so engines hand it the full weight
            rows, weight, bias = lm_head_operands(rows, head)
            t_rows, t_weight, t_bias = lm_head_operands(teacher_rows, teacher_head)
            return clinkd_kernels.linear_kd_loss(
                rows,
                weight,
                labels,
                bias=bias,
                teacher_hidden=t_rows,
                teacher_weight=t_weight,
                teacher_bias=t_bias,
                temperature=self.temperature,
                alpha=1.0,
                beta=0.0,
                reduction="sum",
            )

        loss_sum = call_in_forward(student_head, head_loss, student_rows)
        n_valid = (labels != -100).sum()
        if num_items_in_batch is None:
            loss = loss_sum / n_valid.clamp(min=1)
        else:
            loss = loss_sum / (
                num_items_in_batch.to(loss_sum.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            )
        no_entropy = torch.full((), float("nan"), device=loss.device)
        return loss, no_entropy, n_valid


class ClinkdLossSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose training loss is the (patched) model's own forward with labels: clinkd's
    fused causal-LM cross-entropy, sum over the label tokens / ``num_items_in_batch``, the reduction
    SFTTrainer uses for its own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_cache": False}
        # fused_lm_head=False (the default) makes TRL's wrapper call the model's own forward
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss
