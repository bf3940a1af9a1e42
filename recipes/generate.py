"""Generate text with a Hugging Face checkpoint: a prompt or chat messages in, the new text out.

    mytune generate --config tiny_demo
    mytune generate --config llama3_1_8b --override checkpoint_dir=/models/Llama-3.1-8B-Instruct prompt="Hi there"

The prompt is either raw text (encoded after a bos token) or a conversation rendered with a chat template
(`chat=true` wraps `prompt` as one user message; `messages` gives whole turns). Decoding uses a KV cache and is
greedy at temperature 0, else sampled with temperature / top-k / top-p. The new text (without the prompt) goes to
stdout, one completion per sample; speed (tokens/s, time to first token) goes to stderr, so stdout can be piped.
Decoding stops at the model's eos tokens and, for chat prompts, at the template's end-of-turn token.
"""

import sys
import time
from pathlib import Path

import torch

from mytune.checkpoint import load_hf_model
from mytune.checkpoint.hf import read_json_file
from mytune.config import TuneArgumentParser, require_input_paths
from mytune.data.encoding import TextEncoder, special_token_strings
from mytune.data.formats import RowError
from mytune.data.templates import (
    JinjaChatTemplate,
    Rendered,
    render_chatml,
    render_llama2,
    render_llama3,
    resolve_template,
)
from mytune.errors import MytuneError, run_or_exit
from mytune.generation import stream_generate
from mytune.tokenizers import load_tokenizer
from mytune.training.device import DTYPES, resolve_device, set_seed
from mytune.training.recipe_state import latest_checkpoint
from recipes.params.generate import GenerateParams

# End-of-turn markers that chat templates write after each turn; a chat prompt stops at the ones it contains.
END_OF_TURN_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def render_chat(messages: list[dict[str, str]], template: str, *, bos_token: str, eos_token: str) -> str:
    """The conversation as text, ending with the template's cue for the assistant's answer."""
    try:
        if template == "llama3":
            return render_llama3(messages, bos_token=bos_token, add_generation_prompt=True).text
        if template == "chatml":
            return render_chatml(messages, add_generation_prompt=True).text
        if template == "llama2":  # a llama2 prompt ends with [/INST]: the answer follows directly
            return render_llama2(messages, bos_token=bos_token, eos_token=eos_token).text
        from jinja2.exceptions import TemplateError

        jinja = JinjaChatTemplate(template, {"bos_token": bos_token, "eos_token": eos_token})
        try:
            return jinja.render_text(messages, add_generation_prompt=True)
        except TemplateError as err:
            raise MytuneError(f"the chat template failed on messages: {err}") from None
    except RowError as err:
        raise MytuneError(f"messages: {err}") from None


class GenerateRecipe:
    """load_checkpoint -> prompt_ids -> generate -> (print)."""

    def __init__(self, params: GenerateParams):
        self.params = params
        self.device = resolve_device(params.device)
        self.dtype = DTYPES[params.dtype]
        set_seed(params.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(params.seed)

    def load_checkpoint(self) -> None:
        p = self.params
        # A training recipe's output_dir works too: its newest step_<N> checkpoint is used.
        self.checkpoint_dir = Path(p.checkpoint_dir)
        if not (self.checkpoint_dir / "config.json").is_file():
            self.checkpoint_dir = latest_checkpoint(self.checkpoint_dir, require_recipe_state=False) or self.checkpoint_dir
        self.tokenizer = load_tokenizer(p.tokenizer_path or self.checkpoint_dir)
        self.model = load_hf_model(self.checkpoint_dir, device=self.device, dtype=self.dtype).eval()
        if self.tokenizer.vocab_size > self.model.args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{self.model.args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )

    def prompt_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the prompt, and the ids that end generation."""
        p = self.params
        stop_ids = {self.tokenizer.eos_id, *self._checkpoint_eos_ids()}
        if not p.is_chat:
            return self.tokenizer.encode(p.prompt), sorted(stop_ids)  # BOS as the tokenizer's own rule says

        # null -> the tokenizer's own template (tokenizer.chat_template), else chatml: the rule training uses
        template = resolve_template(p.chat_template, self.tokenizer, "chat")
        bos_token, eos_token = special_token_strings(self.tokenizer)
        messages = p.messages or [{"role": "user", "content": p.prompt}]
        text = render_chat(messages, template, bos_token=bos_token, eos_token=eos_token)
        encoder = TextEncoder(self.tokenizer)  # special-token strings in the text become their ids
        ids, _ = encoder.encode_rendered(Rendered(text))
        for marker in END_OF_TURN_MARKERS:
            if marker in text and (marker_id := encoder.special_id(marker)) is not None:
                stop_ids.add(marker_id)
        return ids, sorted(stop_ids)

    def _checkpoint_eos_ids(self) -> list[int]:
        """eos ids from config.json and generation_config.json (instruct models list several)."""
        ids = []
        sources = [self.model.args.eos_token_id]
        generation_config = self.checkpoint_dir / "generation_config.json"
        if generation_config.is_file():
            config = read_json_file(generation_config, "generation_config.json")
            if not isinstance(config, dict):
                raise MytuneError(f"{generation_config}: must be a JSON object of settings, got a "
                                  f"{type(config).__name__}; fix it, or delete it to use config.json's eos_token_id")
            sources.append(config.get("eos_token_id"))
        for value in sources:
            values = value if isinstance(value, list) else [value]
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
                raise MytuneError(f"eos_token_id {value!r} in {self.checkpoint_dir} is not a token id or a list of "
                                  f"them: fix generation_config.json")
            ids += [v for v in values if v is not None]
        return ids

    def generate(self, prompt_ids: list[int], stop_ids: list[int]) -> tuple[list[list[int]], dict[str, float]]:
        """New ids of each sample (up to, not including, its stop token) and timings: seconds in all, time to first
        token (prompt forward + first sample) and decoding tokens/s (every row's tokens after the first)."""
        p = self.params
        batch = torch.tensor([prompt_ids] * p.num_samples, device=self.device)
        start = time.perf_counter()
        first_token_s = 0.0
        steps = []
        for ids in stream_generate(self.model, batch, p.max_new_tokens, p.temperature, p.top_k, p.top_p,
                                   stop_ids=stop_ids, generator=self.generator):
            steps.append(ids)
            if len(steps) == 1:
                _synchronize(self.device)
                first_token_s = time.perf_counter() - start
        new = torch.stack(steps, dim=1).tolist()  # also waits for the device
        seconds = time.perf_counter() - start
        samples = []
        for row in new:
            stop_at = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            samples.append(row[:stop_at])
        # decoding speed: the tokens of every row after the first step, over the time after the first token
        decode_tokens = (len(steps) - 1) * p.num_samples
        timing = {"seconds": seconds, "first_token_s": first_token_s, "num_steps": len(steps),
                  "decode_tokens_per_s": decode_tokens / max(seconds - first_token_s, 1e-9)}
        return samples, timing


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer reads when it finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def recipe_main(params: GenerateParams) -> list[str]:
    """Generate, print the completions to stdout and the speed to stderr; returns the completions."""
    require_input_paths(params)
    recipe = GenerateRecipe(params)
    recipe.load_checkpoint()
    prompt_ids, stop_ids = recipe.prompt_ids()
    if not prompt_ids:
        raise MytuneError("the prompt encodes to no tokens: set prompt=<text> (or messages)")
    samples, timing = recipe.generate(prompt_ids, stop_ids)
    texts = [recipe.tokenizer.decode(ids, skip_special_tokens=True) for ids in samples]
    for index, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {index + 1} of {len(texts)} ---")
        print(text, flush=True)
    print(
        f"generate: {len(prompt_ids)}-token prompt, {timing['num_steps']} steps x {params.num_samples} sample(s) "
        f"in {timing['seconds']:.2f} s: time to first token {timing['first_token_s'] * 1000:.0f} ms, "
        f"{timing['decode_tokens_per_s']:.1f} tokens/s decoding, on {recipe.device} in {params.dtype}",
        file=sys.stderr, flush=True,
    )
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(GenerateParams, recipe=__file__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="generate")
