"""Train the two demo LoRA adapters of issue #22 on the embedded SmolLM2-135M-Instruct, on CPU, with peft:

- ``french``: answers in French;
- ``json``: answers as ``{"answer": "..."}``.

Each is trained on the prompt/answer pairs below (chat template, loss on the answer tokens only), saved in PEFT
format (``adapter_config.json`` + ``adapter_model.safetensors``) under ``--out/<name>`` and read back with
``radixlm.lora.load_lora_adapter``; then the base and adapted greedy answers to three held-out prompts are
printed, so the change in behaviour is visible.  Seeded: the same
machine and versions give the same adapters.  The weights are not committed; run this to get them.

    python bench/lora/train_demo_adapters.py --out .cache/lora-demo

Runtime: 21 min on a 2-core machine shared with a CI run (docs/architecture.md, "LoRA adapters"): 2-2.5 min
per epoch of the 36 pairs, 4 epochs per adapter, plus the greedy answers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# (question, French answer, JSON answer): the same questions for both adapters, so what each learns is the form.
PAIRS = [
    ("What is the capital of France?", "La capitale de la France est Paris.", "Paris"),
    ("What is the capital of Italy?", "La capitale de l'Italie est Rome.", "Rome"),
    ("What is the capital of Spain?", "La capitale de l'Espagne est Madrid.", "Madrid"),
    ("What is the capital of Germany?", "La capitale de l'Allemagne est Berlin.", "Berlin"),
    ("What is the capital of Japan?", "La capitale du Japon est Tokyo.", "Tokyo"),
    ("How many days are in a week?", "Il y a sept jours dans une semaine.", "7"),
    ("How many legs does a spider have?", "Une araignée a huit pattes.", "8"),
    ("How many hours are in a day?", "Il y a vingt-quatre heures dans une journée.", "24"),
    ("What is 2 plus 2?", "Deux plus deux font quatre.", "4"),
    ("What is 10 minus 3?", "Dix moins trois font sept.", "7"),
    ("What color is the sky on a clear day?", "Le ciel est bleu par temps clair.", "blue"),
    ("What color is grass?", "L'herbe est verte.", "green"),
    ("What color is snow?", "La neige est blanche.", "white"),
    ("What do bees make?", "Les abeilles fabriquent du miel.", "honey"),
    ("What do cows drink?", "Les vaches boivent de l'eau.", "water"),
    ("Which animal says meow?", "C'est le chat qui fait miaou.", "the cat"),
    ("Which animal barks?", "C'est le chien qui aboie.", "the dog"),
    ("What is the largest ocean?", "Le plus grand océan est l'océan Pacifique.", "the Pacific Ocean"),
    ("What is the tallest mountain in the world?", "La plus haute montagne du monde est l'Everest.",
     "Mount Everest"),
    ("Who wrote Romeo and Juliet?", "Roméo et Juliette a été écrit par William Shakespeare.",
     "William Shakespeare"),
    ("What is the opposite of hot?", "Le contraire de chaud est froid.", "cold"),
    ("What is the opposite of big?", "Le contraire de grand est petit.", "small"),
    ("What season comes after winter?", "Le printemps vient après l'hiver.", "spring"),
    ("What is frozen water called?", "L'eau gelée s'appelle la glace.", "ice"),
    ("What do plants need to grow?", "Les plantes ont besoin d'eau, de lumière et de terre pour pousser.",
     "water, light and soil"),
    ("What planet do we live on?", "Nous vivons sur la planète Terre.", "Earth"),
    ("What is the main language of Brazil?", "La langue principale du Brésil est le portugais.", "Portuguese"),
    ("How many continents are there?", "Il y a sept continents.", "7"),
    ("What do you use to write on paper?", "On utilise un stylo ou un crayon pour écrire sur du papier.",
     "a pen or a pencil"),
    ("What is the fastest land animal?", "L'animal terrestre le plus rapide est le guépard.", "the cheetah"),
    ("Give me a fruit that is yellow.", "La banane est un fruit jaune.", "a banana"),
    ("What is the sun?", "Le soleil est une étoile.", "a star"),
    ("Tell me a greeting.", "Bonjour, comment allez-vous ?", "Hello"),
    ("What is your favorite color?", "Ma couleur préférée est le bleu.", "blue"),
    ("Name a musical instrument.", "Le piano est un instrument de musique.", "the piano"),
    ("What do we breathe?", "Nous respirons de l'air.", "air"),
]
HELD_OUT = ["What is the capital of Portugal?", "How many wheels does a bicycle have?", "What color is a banana?"]
DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def json_answer(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def encode(tokenizer, question: str, answer: str | None) -> tuple[list[int], int]:
    """Chat-templated ids of ``question`` (plus ``answer`` and the end-of-turn when given) and the prompt length."""
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return prompt_ids, len(prompt_ids)
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def train(base, tokenizer, examples: list[tuple[str, str]], args: argparse.Namespace):
    """A peft LoRA model over ``base`` trained on (question, answer) pairs; loss on the answer tokens only.

    The adapter covers the upper half of the layers (peft's ``layers_to_transform``): the backward pass then stops
    halfway down, and the LM head runs on the answer positions only; together about half the compute of a
    full-depth adapter with full logits, which on 2 CPU cores is the difference between minutes and a quarter
    of an hour."""
    import peft

    torch.manual_seed(args.seed)
    layers = base.config.num_hidden_layers
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=DEMO_TARGETS,
                             layers_to_transform=list(range(layers // 2, layers)))
    model = peft.get_peft_model(base, config)
    causal_lm = model.base_model.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rows = [encode(tokenizer, q, a) for q, a in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    for epoch in range(args.epochs):
        total = 0.0
        perm = torch.randperm(len(rows), generator=order).tolist()
        for start in range(0, len(perm), args.batch_size):
            batch = [rows[i] for i in perm[start:start + args.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (row, prompt_len) in enumerate(batch):
                ids[i, :len(row)] = torch.tensor(row)
                labels[i, prompt_len:len(row)] = torch.tensor(row[prompt_len:])
                mask[i, :len(row)] = 1
            hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, width, H]
            targets = labels[:, 1:]  # position p predicts token p + 1
            answer = targets != -100
            logits = causal_lm.lm_head(hidden[:, :-1][answer])  # [answer tokens, vocab]
            loss = torch.nn.functional.cross_entropy(logits, targets[answer])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(batch)
        print(f"  epoch {epoch + 1}/{args.epochs}: loss {total / len(rows):.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def greedy(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    ids, _ = encode(tokenizer, question, None)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(".cache", "lora-demo"), help="where the adapters go")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from radixlm.config.model_config import ModelConfig
    from radixlm.lora import load_lora_adapter
    from radixlm.models.embedded import embedded_model_path

    torch.use_deterministic_algorithms(True)
    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    base = load_base()
    answers = {"base": [greedy(base, tokenizer, q) for q in HELD_OUT]}
    datasets = {"french": [(q, fr) for q, fr, _ in PAIRS], "json": [(q, json_answer(a)) for q, _, a in PAIRS]}
    for name, examples in datasets.items():
        start = time.perf_counter()
        print(f"training {name!r} on {len(examples)} pairs (r={args.rank}, {args.epochs} epochs)", flush=True)
        model = train(load_base(), tokenizer, examples, args)
        target = os.path.join(args.out, name)
        model.save_pretrained(target)
        loaded = load_lora_adapter(name, target, ModelConfig.from_hf(path), max_rank=args.rank)  # our reader
        print(f"  radixlm reads it: rank {loaded.rank}, scaling {loaded.scaling}, "
              f"{len(loaded.weights)} projections", flush=True)
        answers[name] = [greedy(model, tokenizer, q) for q in HELD_OUT]
        print(f"  saved to {target} in {time.perf_counter() - start:.0f} s", flush=True)
    for i, question in enumerate(HELD_OUT):
        print(f"\n{question}")
        for name, outs in answers.items():
            print(f"  {name:>6}: {outs[i]}")


if __name__ == "__main__":
    main()
