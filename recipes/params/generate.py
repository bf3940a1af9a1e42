"""Parameters of the `generate` recipe: the one schema for its YAML configs and `--override`s."""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mytune.config.validation import check_finite_floats
from mytune.errors import ConfigError

MAX_NUM_SAMPLES = 16


@dataclass
class GenerateParams:
    """Generate text from a Hugging Face checkpoint: a prompt (or chat messages) in, the new text out."""

    # Fields checked for existence before any heavy work (`mytune validate` reports them as warnings).
    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("checkpoint_dir", "tokenizer_path")

    # Model and tokenizer
    checkpoint_dir: str = ""  # Hugging Face model directory to generate with, or a recipe output_dir (its newest step_N)
    hub_repo: str = ""  # the Hugging Face hub repo (owner/name) checkpoint_dir holds; `mytune download` fetches it
    tokenizer_path: str = ""  # tokenizer file or directory; empty means the tokenizer files in checkpoint_dir

    # Prompt
    prompt: str = ""  # text the model continues (with chat=true: the one user message)
    chat: bool = False  # send prompt as one user message through the chat template instead of as raw text
    messages: list[dict[str, str]] | str = field(default_factory=list)  # chat turns [{role, content}, ...] ending with a user turn, instead of prompt (on the command line: JSON text)
    chat_template: str | None = None  # null: the tokenizer's own template, else chatml; or llama2, llama3, chatml, tokenizer, a Jinja string

    # Decoding
    max_new_tokens: int = 256  # stop after this many new tokens (earlier at eos)
    temperature: float = 0.6  # softmax temperature; 0 means greedy (argmax)
    top_k: int | None = None  # sample only from the k most likely tokens (null: no limit)
    top_p: float | None = 0.9  # sample only from the smallest set of tokens whose probability reaches top_p (null: no limit)
    num_samples: int = 1  # completions of the same prompt, decoded as one batch (at most 16)
    seed: int = 0  # seeds the sampling, so a run repeats exactly

    # Precision and device
    dtype: Literal["bf16", "fp32"] = "bf16"  # parameter and compute dtype
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps

    def __post_init__(self) -> None:
        check_finite_floats(self)
        if not self.checkpoint_dir:
            raise ConfigError("checkpoint_dir is empty: set checkpoint_dir=<Hugging Face model dir>")
        self.messages = _parse_messages(self.messages)
        if self.messages and self.prompt:
            raise ConfigError("both prompt and messages are set: use prompt (with chat=true for one user turn) "
                              "or messages, not both")
        if not self.messages and not self.prompt:
            raise ConfigError("prompt is empty: set prompt=<text> (or messages=[{role: user, content: ...}])")
        if self.chat_template is not None and not self.is_chat:
            raise ConfigError(f"chat_template={self.chat_template!r} but the prompt is raw text: set chat=true "
                              "(or messages) to use a chat template, or chat_template=null")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] or null, got {self.top_p}")
        if not 1 <= self.num_samples <= MAX_NUM_SAMPLES:
            raise ConfigError(f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError(f"num_samples={self.num_samples} with temperature=0 gives identical greedy copies: "
                              "set temperature > 0 or num_samples=1")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu"):
            from mytune.training.device import check_device_available

            check_device_available(self.device)

    @property
    def is_chat(self) -> bool:
        """The prompt goes through a chat template (chat=true or messages given)."""
        return self.chat or bool(self.messages)


def _parse_messages(value: list[dict[str, str]] | str) -> list[dict[str, str]]:
    """messages from YAML (a list of mappings) or the command line (JSON / YAML flow text), checked."""
    if isinstance(value, str):
        import yaml  # JSON is YAML flow syntax, so both spellings parse

        try:
            value = yaml.safe_load(value) if value.strip() else []
        except yaml.YAMLError:
            raise ConfigError(f"messages: cannot parse {value!r}; write a JSON list such as "
                              '[{"role": "user", "content": "Hi"}]') from None
        if value is None:
            value = []
    if not isinstance(value, list):
        raise ConfigError(f"messages must be a list of {{role, content}} mappings, got {value!r}")
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and set(message) == {"role", "content"}
                and all(isinstance(v, str) for v in message.values())):
            raise ConfigError(f"messages[{index}] must be a mapping with string role and content only, got {message!r}")
    if value and value[-1]["role"] != "user":
        raise ConfigError(f"messages must end with a user turn for the model to answer, the last is "
                          f"{value[-1]['role']!r}")
    return [dict(m) for m in value]
