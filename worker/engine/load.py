"""Loading: llama.cpp's log, the model and its context.

``load_llama`` builds the ``Llama`` object (used afterwards only for chat templates and
tokenizing) with a context of ``spec.parallel`` sequences, each with a KV cache of its
own of ``spec.n_ctx`` cells (llama.cpp's non-unified KV: ``n_ctx * parallel`` cells in
all, one stream per sequence).

Why not one unified cache shared by all slots (llama-server's default, less memory)?
There a sequence's cells land wherever cells are free, next to other slots' cached
prompts, and the CPU kernels sum attention terms in SIMD lanes by cell index: the same
greedy request served alone then gave different text depending on what the other slots
had cached (measured here: JSON-mode output ran to max_tokens instead of closing). With
a stream per sequence a slot's cells always start at cell 0, as with ``parallel`` 1, so
a request served alone decodes exactly as it would on a one-slot worker; and a slot can
never run out of cells because of the others. The price is KV memory growing with
``parallel``, which the planner counts (supervisor/planner.py).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

import llama_cpp
import llama_cpp._internals
import llama_cpp.llama
import llama_cpp.llama_cpp as llama_lib
from llama_cpp import llama_chat_format

from worker.engine import rpc
from worker.protocol import LLAMA_LOG_PREFIX, LaunchSpec, is_oom_line

_SPLIT_MODES = {
    "none": llama_lib.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_lib.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_lib.LLAMA_SPLIT_MODE_ROW,
}
_FLASH_ATTN = {
    "auto": llama_lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class LoadError(Exception):
    """The model could not be loaded (reason in the message)."""


class OutOfMemory(LoadError):
    """Loading failed and llama.cpp logged out-of-memory lines."""


class BadSetting(LoadError):
    """A setting of the launch spec that only the loaded model can check is wrong (an
    unknown built-in chat template name): restarting cannot help."""


class LoadCancelled(LoadError):
    """Loading was aborted on purpose (the worker is stopping)."""


# ggml_log_level in the llama.cpp that llama-cpp-python 0.3.36 vendors.
_LOG_DEBUG = 1
_LOG_CONT = 5  # continues the previous message


_installed: LlamaLog | None = None  # the LlamaLog llama.cpp calls now; see install()


class LlamaLog:
    """Receives llama.cpp / ggml log text from any thread.

    Text arrives in fragments (and as CONT continuations), so it is buffered until a
    newline; each whole line goes to ``stream`` with LLAMA_LOG_PREFIX, except DEBUG lines
    (thousands per load: one per tensor). Every line, DEBUG included, is checked for
    out-of-memory messages: the worker's exit code depends on them.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._buf = ""
        self._buf_level = 0
        self._lock = threading.Lock()
        self.oom_lines: list[str] = []
        # Keep a reference: llama.cpp holds only the raw function pointer.
        self._callback = llama_lib.llama_log_callback(self._on_log)

    def install(self) -> None:
        global _installed
        llama_lib.llama_log_set(self._callback, ctypes.c_void_p(0))
        # llama.cpp keeps only the raw function pointer, for the whole process: if this object
        # were collected, its next log line would jump into freed memory (a segfault in the
        # test process, which installs one per test and then loads a model later).
        _installed = self

    def _on_log(self, level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
        # An exception escaping a ctypes callback is printed and swallowed; never raise.
        try:
            if not text:
                return
            chunk = text.decode("utf-8", errors="replace")
            with self._lock:
                if not self._buf and level != _LOG_CONT:
                    self._buf_level = level
                self._buf += chunk
                if "\n" not in self._buf:
                    return
                *lines, self._buf = self._buf.split("\n")
                for line in lines:
                    self._line(line, self._buf_level)
                if level != _LOG_CONT:
                    self._buf_level = level
        except Exception:
            pass

    def _line(self, line: str, level: int) -> None:
        if is_oom_line(line):
            self.oom_lines.append(line)
        elif level == _LOG_DEBUG:
            return
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(f"{LLAMA_LOG_PREFIX}{line}\n")
        stream.flush()

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                line, self._buf = self._buf, ""
                self._line(line, self._buf_level)


class _NoRedirect:
    """Replacement for llama_cpp's suppress_stdout_stderr.

    With verbose=False llama-cpp-python dup2()s /dev/null over fds 1 and 2 for the whole
    process while it loads; that would swallow our own log lines (and the HTTP server's)
    from other threads. Our log callback already decides what reaches stderr.
    """

    def __init__(self, disable: bool = True) -> None:
        pass

    def __enter__(self) -> _NoRedirect:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


for _mod in (llama_cpp.llama, llama_cpp._internals, llama_chat_format):
    if hasattr(_mod, "suppress_stdout_stderr"):
        setattr(_mod, "suppress_stdout_stderr", _NoRedirect)


def load_llama(
    spec: LaunchSpec, log: LlamaLog, abort: threading.Event, progress: Callable[[float], None]
) -> llama_cpp.Llama:
    """Load the model; raises OutOfMemory, LoadCancelled or LoadError."""

    def on_progress(value: float, _user_data: ctypes.c_void_p) -> bool:
        try:
            progress(float(value))
        except Exception:
            pass
        return not abort.is_set()  # False aborts the load

    progress_cb = llama_lib.llama_progress_callback(on_progress)
    # Llama() builds its llama_model_params and llama_context_params itself and offers
    # neither a progress hook nor n_seq_max / kv_unified (nor flash attention's "auto"), so
    # we wrap the default-params factories and the context's creation it calls for the
    # duration of the constructor. Nothing else calls them meanwhile: the load is the only
    # llama.cpp work running.
    model_defaults = llama_lib.llama_model_default_params
    context_defaults = llama_lib.llama_context_default_params
    init_context = llama_lib.llama_init_from_model
    devices = rpc_devices(spec)  # kept alive until the model is loaded (llama.cpp copies the list)

    def model_params() -> Any:
        params = model_defaults()
        params.progress_callback = progress_cb
        if devices is not None:
            params.devices = ctypes.cast(devices, ctypes.c_void_p).value
        return params

    def context_params() -> Any:
        params = context_defaults()
        params.n_seq_max = spec.parallel
        params.kv_unified = False  # one stream of n_ctx cells per sequence (see above)
        return params

    def init_from_model(model: Any, params: Any) -> Any:
        # Llama() can only say on or off; "auto" (llama.cpp's and llama-server's default)
        # is set on the parameters it passes.
        params.flash_attn_type = _FLASH_ATTN[spec.flash_attn]
        return init_context(model, params)

    kwargs: dict[str, Any] = {
        "n_gpu_layers": spec.n_gpu_layers,
        "split_mode": _SPLIT_MODES[spec.split_mode],
        "main_gpu": spec.main_gpu,
        "tensor_split": spec.tensor_split,
        # llama.cpp divides n_ctx among the sequences.
        "n_ctx": spec.n_ctx * spec.parallel,
        "n_batch": spec.n_batch,
        "flash_attn": spec.flash_attn == "on",
        "chat_format": spec.chat_format,
        "verbose": False,
    }
    if spec.n_threads is not None:
        kwargs["n_threads"] = spec.n_threads
        kwargs["n_threads_batch"] = spec.n_threads
    llama_lib.llama_model_default_params = model_params
    llama_lib.llama_context_default_params = context_params
    llama_lib.llama_init_from_model = init_from_model
    try:
        llama = llama_cpp.Llama(spec.model_path, **kwargs)
    except Exception as e:
        log.flush()
        if abort.is_set():
            raise LoadCancelled("model load aborted: the worker is stopping") from None
        if log.oom_lines:
            raise OutOfMemory(f"out of memory while loading: {log.oom_lines[-1]}") from None
        raise LoadError(f"llama.cpp could not load {spec.model_path}: {e}") from None
    finally:
        llama_lib.llama_model_default_params = model_defaults
        llama_lib.llama_context_default_params = context_defaults
        llama_lib.llama_init_from_model = init_context
    log.flush()
    if spec.chat_template:
        try:
            override_chat_template(llama, spec.chat_template)
        except LoadError:
            llama.close()
            raise
    return llama


def rpc_devices(spec: LaunchSpec) -> Any:
    """The NULL-terminated device list for ``llama_model_params.devices`` when the plan uses
    remote devices (None: llama.cpp's default, the local GPUs). Remote first, then the local
    GPUs: the order the plan's tensor_split is written in."""
    if not spec.rpc_devices:
        return None
    try:
        arr, names = rpc.model_devices(spec.rpc_devices)
    except rpc.RpcUnavailable as e:
        raise BadSetting(f"rpc_devices {spec.rpc_devices}: {e}") from None
    if spec.tensor_split is not None and len(spec.tensor_split) != len(names):
        raise BadSetting(
            f"tensor_split has {len(spec.tensor_split)} entries for {len(names)} devices ({', '.join(names)})"
        )
    sys.stderr.write(f"{LLAMA_LOG_PREFIX}devices for the model: {', '.join(names)}\n")
    return arr


def builtin_templates() -> list[str]:
    """The names of llama.cpp's built-in chat templates (``llama_chat_builtin_templates``)."""
    n = llama_lib.llama_chat_builtin_templates((ctypes.c_char_p * 0)(), 0)
    names = (ctypes.c_char_p * n)()
    llama_lib.llama_chat_builtin_templates(names, n)
    return [bytes(x).decode() for x in names if x is not None]


def override_chat_template(llama: llama_cpp.Llama, value: str) -> None:
    """Use ``value`` instead of the GGUF's chat template everywhere the template is read
    (chat, tool-call detection, /apply-template, /props): a llama.cpp built-in template
    name is rendered by llama.cpp's own C++ formatter (``llama_chat_apply_template``), any
    other value is a Jinja file, which takes the GGUF template's place in the metadata."""
    if value in builtin_templates():
        llama.chat_handler = _builtin_handler(value)  # type: ignore[assignment]
        llama.chat_format = None
        return
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BadSetting(
            f"chat_template {value!r} is neither a readable Jinja file ({e}) nor one of "
            f"llama.cpp's built-in templates: {', '.join(builtin_templates())}"
        ) from None
    eos_id, bos_id = llama.token_eos(), llama.token_bos()
    llama.metadata["tokenizer.chat_template"] = text
    llama._chat_handlers["chat_template.default"] = llama_chat_format.Jinja2ChatFormatter(
        template=text,
        eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
        stop_token_ids=[eos_id],
    ).to_chat_handler()
    llama.chat_format = "chat_template.default"
    llama.chat_handler = None


def _builtin_handler(name: str) -> Callable[..., Any]:
    """A chat handler (llama-cpp-python's calling convention) rendering with llama.cpp's
    built-in template ``name``; the prompt text goes to ``create_completion`` as the
    Jinja handlers' does (worker/engine/prompt.py captures it there)."""

    def handler(*, llama: Any, messages: list[dict[str, Any]], **_: Any) -> Any:
        keep: list[Any] = []
        chat = (llama_lib.llama_chat_message * len(messages))()
        for i, m in enumerate(messages):
            role, content = str(m.get("role", "")).encode(), str(m.get("content") or "").encode()
            keep += (role, content)
            chat[i].role, chat[i].content = role, content
        tmpl = name.encode()
        size = 4096 + 2 * sum(len(x) for x in keep)
        buf = ctypes.create_string_buffer(size)
        n = llama_lib.llama_chat_apply_template(tmpl, chat, len(messages), True, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = llama_lib.llama_chat_apply_template(tmpl, chat, len(messages), True, buf, n)
        if n < 0:
            raise ValueError(f"llama.cpp's {name} template could not render these messages")
        prompt = buf.raw[:n].decode("utf-8", errors="replace")
        return llama.create_completion(prompt=prompt, stop=[])

    return handler
