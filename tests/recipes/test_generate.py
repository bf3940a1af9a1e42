"""End to end: `mytune generate` on a tiny random Llama saved with transformers, against transformers' generate."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mytune.config import TuneArgumentParser
from mytune.errors import ConfigError
from recipes import generate as recipe
from recipes.params.generate import GenerateParams

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Reverse the words: apple river stone.",
    "Add the two numbers: 27 + 7 = 34.", "What is the capital of France? Paris.",
    "user\nassistant\nsystem\n", "Hello there, how are you today? I am fine, thanks.",
]
PROMPT = "The quick brown fox"
# A tokenizer's own template, unlike every built-in one (so the test sees that it, not a fallback, was used).
OWN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>### ' + m['role'] + ':\n' + m['content'] + "
                "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>### assistant:\n' }}{% endif %}")


def console_command() -> list[str]:
    """The installed `mytune` script next to this interpreter, else the same entry point through `-m`."""
    script = Path(sys.executable).parent / "mytune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mytune.cli.main"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM (save_pretrained) with a byte-level BPE tokenizer.json trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))

    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the 0.02 init, so greedy decoding does not just repeat one token
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    model.save_pretrained(out)
    return out


def hf_tokenizer(checkpoint: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"), bos_token="<s>", eos_token="</s>")


def hf_reference(checkpoint: Path, messages=None, prompt=PROMPT, max_new_tokens=20,
                 eos=(1,)) -> tuple[list[int], str, list[int]]:
    """Prompt ids, decoded greedy completion and its ids, by transformers alone (OWN_TEMPLATE for `messages`)."""
    from transformers import AutoModelForCausalLM

    tokenizer = hf_tokenizer(checkpoint)
    if messages is None:
        prompt_ids = tokenizer(prompt)["input_ids"]  # BOS where the tokenizer's own rule puts one
    else:
        prompt_ids = tokenizer.apply_chat_template(messages, chat_template=OWN_TEMPLATE, tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(eos), pad_token_id=eos[0])
    new = out[0, len(prompt_ids):].tolist()
    return prompt_ids, tokenizer.decode(new, skip_special_tokens=True), new


def write_config(tmp_path: Path, **values) -> Path:
    config = {"checkpoint_dir": "", "dtype": "fp32", "device": "cpu", "temperature": 0.0, "top_p": None,
              "max_new_tokens": 20, **values}
    path = tmp_path / "generate.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    return path


def test_cli_greedy_output_equals_transformers(checkpoint, tmp_path):
    _, expected, new = hf_reference(checkpoint)
    assert len(new) >= 5 and len(set(new)) >= 3, new  # a real continuation, not an immediate eos
    config = write_config(tmp_path, prompt="placeholder")
    run = subprocess.run([*console_command(), "generate", "--config", str(config), "--override",
                          f"checkpoint_dir={checkpoint}", f"prompt={PROMPT}"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    assert "tokens/s" in run.stderr and "time to first token" in run.stderr


def test_cli_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    config = write_config(tmp_path, prompt="hi")
    run = subprocess.run([*console_command(), "generate", "--config", str(config), "--override",
                          f"checkpoint_dir={tmp_path / 'no_such_model'}"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint_dir" in lines[0] and "no_such_model" in lines[0], run.stderr
    assert run.stdout == ""


def parse(config: Path, *overrides: str) -> GenerateParams:
    argv = ["--config", str(config), *(["--override", *overrides] if overrides else [])]
    return TuneArgumentParser(GenerateParams, recipe="generate").parse_params(argv)


def test_generation_stops_at_eos_ids_of_generation_config(checkpoint, tmp_path, capsys):
    _, _, free = hf_reference(checkpoint)
    stop = free[3]  # an ordinary token: the text ends before it (special eos tokens are never printed anyway)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    generation_config = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**generation_config, "eos_token_id": [1, stop]}))
    expected = hf_tokenizer(ckpt).decode(free[:free.index(stop)], skip_special_tokens=True)
    texts = recipe.recipe_main(parse(write_config(tmp_path, prompt=PROMPT), f"checkpoint_dir={ckpt}"))
    assert texts == [expected]
    assert capsys.readouterr().out == expected + "\n"


def test_chat_messages_use_the_tokenizers_template_and_stop_at_end_of_turn(checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "chat_ckpt"
    shutil.copytree(checkpoint, ckpt)
    tokenizer_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": OWN_TEMPLATE}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    im_end = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]["<|im_end|>"]
    prompt_ids, expected, _ = hf_reference(ckpt, messages=messages, eos=(1, im_end))

    # messages as JSON text on the command line (commas inside content included)
    params = parse(write_config(tmp_path, prompt=""), f"checkpoint_dir={ckpt}", f"messages={json.dumps(messages)}")
    assert params.messages == messages
    generate = recipe.GenerateRecipe(params)
    generate.load_checkpoint()
    ours_ids, stop_ids = generate.prompt_ids()
    assert ours_ids == prompt_ids
    assert im_end in stop_ids
    assert recipe.recipe_main(params) == [expected]
    assert capsys.readouterr().out == expected + "\n"

    # chat=true wraps the prompt as one user message through the same template
    one_turn = parse(write_config(tmp_path, prompt="Hello, how are you?", chat=True), f"checkpoint_dir={ckpt}")
    one_turn_recipe = recipe.GenerateRecipe(one_turn)
    one_turn_recipe.load_checkpoint()
    assert one_turn_recipe.prompt_ids()[0] == hf_reference(ckpt, messages=messages[1:], max_new_tokens=1)[0]


def test_sampled_samples_are_seeded_and_top_k_1_is_greedy(checkpoint, tmp_path, capsys):
    config = write_config(tmp_path, prompt=PROMPT, max_new_tokens=8)
    greedy = recipe.recipe_main(parse(config, f"checkpoint_dir={checkpoint}"))
    top1 = recipe.recipe_main(parse(config, f"checkpoint_dir={checkpoint}", "temperature=1.0", "top_k=1",
                                    "num_samples=2"))
    assert top1 == greedy * 2
    sampled = [recipe.recipe_main(parse(config, f"checkpoint_dir={checkpoint}", "temperature=1.0", "num_samples=3",
                                        f"seed={seed}")) for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    out = capsys.readouterr().out
    assert "--- sample 3 of 3 ---" in out


@pytest.mark.parametrize("overrides, message", [
    (["prompt=hi", 'messages=[{"role": "user", "content": "hi"}]'], "both prompt and messages"),
    (["prompt="], "prompt is empty"),
    (["prompt=", 'messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'],
     "end with a user turn"),
    (["prompt=", 'messages=[{"role": "user"}]'], "messages[0]"),
    (["prompt=hi", "chat_template=chatml"], "chat_template"),
    (["prompt=hi", "top_p=0"], "top_p"),
    (["prompt=hi", "top_k=0"], "top_k"),
    (["prompt=hi", "num_samples=2"], "temperature=0"),
    (["prompt=hi", "num_samples=100", "temperature=1"], "num_samples"),
    (["prompt=hi", "max_new_tokens=0"], "max_new_tokens"),
])
def test_bad_params_name_the_field(tmp_path, overrides, message):
    from mytune.config.load import load_params

    with pytest.raises(ConfigError) as err:
        load_params(GenerateParams, config=write_config(tmp_path, checkpoint_dir="/x"), overrides=overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_messages_from_yaml_list(tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text("checkpoint_dir: /x\nmessages:\n  - role: system\n    content: Be brief, please.\n"
                      "  - {role: user, content: 'Hi, there'}\n")
    params = parse(config)
    assert params.messages == [{"role": "system", "content": "Be brief, please."},
                               {"role": "user", "content": "Hi, there"}]
    assert params.is_chat


def test_an_output_dir_means_its_newest_step_checkpoint(checkpoint, tmp_path, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(checkpoint, output_dir / "step_12")
    (output_dir / "step_3").mkdir()  # an older step: must not be chosen
    _, expected, _ = hf_reference(checkpoint)
    texts = recipe.recipe_main(parse(write_config(tmp_path, prompt=PROMPT), f"checkpoint_dir={output_dir}"))
    assert texts == [expected]
