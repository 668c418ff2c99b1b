"""The plain reference of bench/train_speed.py: transformers ``Trainer`` + PEFT LoRA in fp32.

    python bench/plain_lora.py CONFIG.json      (train_speed.py writes CONFIG.json)

What a user would write without the studio: the model in fp32, ``DataCollatorForSeq2Seq``
(pad to the longest row of the batch, labels padded with -100), AdamW, a linear schedule. The
features are the ones ``studio.data.tokenize`` made (saved by train_speed.py), so both sides see
identical tokens and prompt masks. Tokens/s is counted exactly as ``StudioTrainer`` does:
``attention_mask == 1`` tokens of the training steps over the time spent inside them. Writes
one JSON object of results to the config's ``out``.
"""

import json
import sys
import time

import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vm_hwm() -> int:
    """This process's peak resident set (VmHWM), in bytes: the figure the studio records too."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


class TimedTrainer(Trainer):
    tokens, seconds = 0, 0.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens += int(inputs["attention_mask"].sum())
        started = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.seconds += time.perf_counter() - started


def main(config_path: str) -> None:
    c = json.loads(open(config_path, encoding="utf-8").read())
    torch.manual_seed(c["seed"])
    tokenizer = AutoTokenizer.from_pretrained(c["model"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=c["output_dir"], max_steps=c["steps"], per_device_train_batch_size=c["batch_size"],
        per_device_eval_batch_size=c["batch_size"], learning_rate=c["learning_rate"],
        lr_scheduler_type="linear", warmup_steps=c["warmup_ratio"], weight_decay=0.0,
        optim="adamw_torch", logging_steps=1, eval_strategy="no", save_strategy="no", seed=c["seed"],
        data_seed=c["seed"], report_to="none", remove_unused_columns=False, disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)  # pad to longest
    trainer = TimedTrainer(model=model, args=args, train_dataset=load_from_disk(c["train"]),
                           eval_dataset=load_from_disk(c["eval"]), processing_class=tokenizer,
                           data_collator=collator)
    trainer.train()
    result = {"tokens": trainer.tokens, "step_seconds": trainer.seconds,
              "tokens_per_s": trainer.tokens / max(trainer.seconds, 1e-9), "peak_rss_bytes": vm_hwm(),
              "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
              "steps": trainer.state.global_step, "threads": torch.get_num_threads()}
    result["eval_loss"] = trainer.evaluate()["eval_loss"]  # after the peak RSS: as the studio records it
    if c["exact_match_rows"] > 0:
        from studio.evaluate import score_task  # the studio's scorer: the same prompts and matching

        model.eval()
        model.config.use_cache = True
        score = score_task(model, tokenizer, c["task"], limit=c["exact_match_rows"])
        result["exact_match"] = score.exact_match
    with open(c["out"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
