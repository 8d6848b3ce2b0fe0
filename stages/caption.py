"""caption: a text caption per kept clip, from open_clip CoCa or an OpenAI-compatible VLM server.

Reads `keyframes` (JPEG: first, middle, last) and `keep`; adds
  caption         the clip's caption (null for rejected clips, source-error rows, failures)
  caption_source  where it came from: "coca:<model>", "endpoint:<model>", or
                  "merged:<frame source>+<model>" (null when there is no caption)
  caption_error   why a kept clip has no caption, or why the merge step failed (then the
                  frame caption is kept and caption_source says it is the frame caption)

Backends:
  coca      open_clip CoCa on the middle keyframe, greedy decoding, all middle keyframes of
            a batch in one forward pass per token: SVD's first caption. Default
            coca_ViT-B-32 (mscoco_finetuned_laion2b_s13b_b90k) for CPU; coca_ViT-L-14 with the
            same tag on GPU.
  endpoint  any OpenAI-compatible chat-completions server with image input (vLLM serving a
            VLM, or a hosted API): the keyframes (`frames`: the middle one or all three) as
            base64 JPEG data URLs, through httpx: one pool of kept-alive connections,
            at most `max_concurrency` requests in flight, a timeout per request and
            retries with exponential backoff (or a 429/503's Retry-After, up to a minute)
            for timeouts, connection errors, 5xx/408/429 answers and malformed answers.
            Other 4xx answers fail at once.
With `merge: true` two more calls per clip (to endpoint_url) reproduce SVD's third caption:
a multi-frame caption of all keyframes (SVD used a video captioner), then a text-only call
that merges the frame caption and the multi-frame caption into one.

Only clips still kept by the earlier (cheap) filter step are captioned: rejected clips get
null and cost nothing. `stats` counts the images captioned and the requests sent.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import json
import logging
import math
import os
import threading
import time
from typing import Any, Literal

import httpx

from stages import instrument
from stages.base import Batch, Stage
from stages.model_batch import error_text, is_clip_row, is_kept
from stages.open_clip_loader import OpenClipWeights, decode_rgb, preprocess_batch
from stages.torch_setup import resolve_device, set_torch_threads, validate_device_args
from stages.weights import WeightRequirement

log = logging.getLogger(__name__)

SOT_TOKEN, EOT_TOKEN = 49406, 49407  # CLIP BPE start/end of text
DEFAULT_PROMPT = "Describe this video frame in one sentence: the main subject, the setting and any action."
DEFAULT_VIDEO_PROMPT = ("These are the first, middle and last frames of one video clip, in order. Describe the clip "
                        "in one sentence: what is shown and how it moves or changes.")
DEFAULT_MERGE_PROMPT = ("Two descriptions of the same video clip follow. Write one concise sentence that keeps the "
                        "visual details of the first and the motion of the second. Answer with the sentence only.\n"
                        "Frame description: {frame_caption}\nClip description: {video_caption}")


class EndpointError(RuntimeError):
    """A request that failed for good (after its retries)."""


# ---- the chat-completions client ----------------------------------------------------------

def jpeg_data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def chat_url(endpoint_url: str) -> str:
    """Accept a base URL (http://host:8000/v1) or the full chat-completions URL."""
    url = endpoint_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


RETRY_AFTER_CAP_S = 60.0  # the longest a server's Retry-After is obeyed


class ChatClient:
    """OpenAI chat-completions client on httpx. One connection pool for every thread of the
    stage, so connections are reused (keep-alive) instead of opened per request; at most
    `max_in_flight` requests at once (a semaphore, so waiting for a slot does not eat into a
    request's timeout); retries with exponential backoff on 408, 429, 5xx, timeouts and
    dropped connections, waiting as long as a 429 or 503's Retry-After asks (up to a minute)
    when that is longer. Other 4xx fail at once: a bad request stays bad."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, max_tokens: int = 77, temperature: float = 0.0,
                 max_in_flight: int = 8):
        self.url, self.model, self.timeout_s, self.retries, self.backoff_s = url, model, timeout_s, retries, backoff_s
        self.max_tokens, self.temperature = max_tokens, temperature
        self._slots = threading.BoundedSemaphore(max_in_flight)
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s),
                                  limits=httpx.Limits(max_connections=max_in_flight,
                                                      max_keepalive_connections=max_in_flight))

    def close(self) -> None:
        self._http.close()

    def complete(self, text: str, images: list[bytes] = (), stats: collections.Counter | None = None) -> str:
        """The answer's text; raises EndpointError naming the last failure once retries are spent."""
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": jpeg_data_url(j)}}
                                         for j in images]
        content.append({"type": "text", "text": text})
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        last, wait_s = "no attempt", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                # Exponential backoff so a struggling server is not hammered by every actor.
                time.sleep(max(self.backoff_s * 2 ** (attempt - 1), wait_s))
            if stats is not None:
                stats["requests"] += 1
            try:
                with self._slots:
                    response = self._http.post(self.url, content=body)
            except httpx.TimeoutException:
                last, wait_s = f"timed out after {self.timeout_s:g}s", 0.0
                continue
            except httpx.TransportError as exc:  # refused, reset, closed half-way
                last, wait_s = f"{type(exc).__name__}: {exc}", 0.0
                continue
            if response.status_code != 200:
                last = f"HTTP {response.status_code}: {response.content[:200]!r}"
                if response.status_code < 500 and response.status_code not in (408, 429):
                    raise EndpointError(last)
                wait_s = retry_after_s(response.headers.get("Retry-After"))
                continue
            try:
                answer = json.loads(response.content)["choices"][0]["message"]["content"]
                if isinstance(answer, list):  # some servers answer with content parts
                    answer = " ".join(p.get("text", "") for p in answer if isinstance(p, dict))
                if not isinstance(answer, str) or not answer.strip():
                    raise ValueError("empty content")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last, wait_s = f"malformed answer ({type(exc).__name__}: {exc}): {response.content[:200]!r}", 0.0
                continue
            return answer.strip()
        raise EndpointError(f"{last} (after {self.retries + 1} attempts)")


def retry_after_s(header: str | None) -> float:
    """A Retry-After header's seconds (a number; an HTTP date counts as none), capped."""
    try:
        return min(RETRY_AFTER_CAP_S, max(0.0, float(header))) if header else 0.0
    except ValueError:
        return 0.0


# ---- CoCa greedy decoding -----------------------------------------------------------------

def coca_greedy(model, images, seq_len: int, min_seq_len: int = 5) -> list[list[int]]:
    """Greedy CoCa decoding of a batch of preprocessed images (N, 3, H, W) -> token ids.

    The image is encoded once; each step runs the text decoder on all captions at once.
    End-of-text is masked until min_seq_len tokens, as open_clip's generate does.
    """
    import torch

    with torch.no_grad():
        encoded = model(images)  # text=None: image features and image tokens only
        latent, embs = encoded["image_features"], encoded["image_embs"]
        n = images.shape[0]
        tokens = torch.full((n, 1), SOT_TOKEN, dtype=torch.long, device=images.device)
        done = torch.zeros(n, dtype=torch.bool, device=images.device)
        for _ in range(seq_len - 1):
            logits = model(images, text=tokens, image_latent=latent, image_embs=embs,
                           output_labels=False)["logits"][:, -1].float()
            logits[:, SOT_TOKEN] = -math.inf
            if tokens.shape[1] < min_seq_len:
                logits[:, EOT_TOKEN] = -math.inf
            nxt = torch.where(done, torch.full_like(done, EOT_TOKEN, dtype=torch.long), logits.argmax(-1))
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == EOT_TOKEN
            if bool(done.all()):
                break
    out = []
    for row in tokens.tolist():
        row = row[1:]
        out.append(row[: row.index(EOT_TOKEN)] if EOT_TOKEN in row else row)
    return out


def decode_tokens(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids) if hasattr(tokenizer, "decode") else __import__("open_clip").decode(ids)
    for special in ("<start_of_text>", "<end_of_text>"):
        text = text.replace(special, "")
    return " ".join(text.split())


# ---- the stage ----------------------------------------------------------------------------

class CaptionStage(Stage):
    """Caption each kept clip."""

    name = "caption"
    outputs = ("caption", "caption_source", "caption_error")

    def __init__(
        self,
        backend: Literal["coca", "endpoint"] = "coca",
        model: str = "coca_ViT-B-32",
        pretrained: str | None = "mscoco_finetuned_laion2b_s13b_b90k",
        model_config: str | None = None,
        cache_dir: str | None = None,
        seq_len: int = 30,
        endpoint_url: str | None = None,
        endpoint_model: str | None = None,
        api_key_env: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        frames: Literal["middle", "all"] = "middle",
        merge: bool = False,
        video_prompt: str = DEFAULT_VIDEO_PROMPT,
        merge_prompt: str = DEFAULT_MERGE_PROMPT,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_tokens: int = 77,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        torch_threads: int | None = None,
    ):
        if backend not in ("coca", "endpoint"):
            raise ValueError(f"backend must be 'coca' or 'endpoint', got {backend!r}")
        if frames not in ("middle", "all"):
            raise ValueError(f"frames must be 'middle' or 'all', got {frames!r}")
        validate_device_args(device, torch_threads)
        self.clip = OpenClipWeights(model, pretrained, model_config, cache_dir) if backend == "coca" else None
        if self.clip is not None:
            self.clip.validate()
        if seq_len < 6:
            raise ValueError(f"seq_len must be >= 6 tokens, got {seq_len}")
        uses_endpoint = backend == "endpoint" or merge
        if uses_endpoint:
            if not endpoint_url or not endpoint_url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint_url must be an http(s) URL of a chat-completions server "
                                 f"(needed by backend 'endpoint' or merge), got {endpoint_url!r}")
            if not endpoint_model:
                raise ValueError("endpoint_model must name the model the server serves")
        if merge and ("{frame_caption}" not in merge_prompt or "{video_caption}" not in merge_prompt):
            raise ValueError("merge_prompt must contain {frame_caption} and {video_caption}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.backend = backend
        self.seq_len = seq_len
        self.endpoint_url, self.endpoint_model, self.api_key_env = endpoint_url, endpoint_model, api_key_env
        self.uses_endpoint = uses_endpoint
        self.prompt, self.frames, self.merge = prompt, frames, merge
        self.video_prompt, self.merge_prompt = video_prompt, merge_prompt
        self.max_concurrency, self.timeout_s, self.retries, self.backoff_s = max_concurrency, timeout_s, retries, backoff_s
        self.max_tokens = max_tokens
        self.device, self.torch_threads = device, torch_threads
        self.stats: collections.Counter[str] = collections.Counter()
        self._ready = False

    # ---- weights -------------------------------------------------------------------------

    def weights(self, step: str | None = None) -> list[WeightRequirement]:
        step = step or self.name
        reqs = self.clip.requirements(step, "CoCa captioner") if self.clip is not None else []
        if self.uses_endpoint:
            reqs.append(WeightRequirement(f"{step}.endpoint_url",
                                          f"chat-completions server serving {self.endpoint_model} (weights live "
                                          f"on the server; not contacted by this check)",
                                          chat_url(self.endpoint_url), True))
            if self.api_key_env:
                reqs.append(WeightRequirement(f"{step}.api_key_env", "API key for the caption endpoint",
                                              f"environment variable {self.api_key_env}",
                                              bool(os.environ.get(self.api_key_env)),
                                              "export it where the pipeline (and its Ray workers) start"))
        return reqs

    def download(self, step: str | None = None, timeout_s: float = 60.0) -> list[str]:
        if self.clip is None:
            return []
        return self.clip.download_errors(step or self.name, timeout_s)

    # ---- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        started = time.perf_counter()
        if self.clip is not None:
            self.device_used = resolve_device(self.device)
            self.threads = set_torch_threads(self.torch_threads)
            self._model, self._preprocess, self._tokenizer = self.clip.load(self.device_used, self.name)
            if not hasattr(self._model, "text_decoder"):
                raise ValueError(f"{self.name}.model: {self.clip.model} is not a CoCa model (no text decoder)")
            instrument.count("model_load", self.name)
        if self.uses_endpoint:
            api_key = None
            if self.api_key_env:
                api_key = os.environ.get(self.api_key_env)
                if not api_key:
                    raise RuntimeError(f"{self.name}.api_key_env: environment variable {self.api_key_env} is not set")
            self._client = ChatClient(chat_url(self.endpoint_url), self.endpoint_model, api_key, self.timeout_s,
                                      self.retries, self.backoff_s, self.max_tokens,
                                      max_in_flight=self.max_concurrency)
        self._ready = True
        self.load_seconds = time.perf_counter() - started
        log.info("caption: backend %s%s ready in %.1fs", self.backend, " + merge" if self.merge else "",
                 self.load_seconds)

    # ---- captioning ----------------------------------------------------------------------

    @property
    def frame_source(self) -> str:
        return f"coca:{self.clip.model}" if self.clip is not None else f"endpoint:{self.endpoint_model}"

    def coca_captions(self, middles: list[bytes]) -> list[str | Exception]:
        """Captions (or the per-image error) of middle keyframes, one batched decode."""
        results: list[str | Exception] = [ValueError("not captioned")] * len(middles)
        images, where = [], []
        for k, jpeg in enumerate(middles):
            try:
                images.append(decode_rgb(jpeg))
                where.append(k)
            except ValueError as exc:
                results[k] = exc
        if images:
            batch = preprocess_batch(self._preprocess, images, self.device_used)
            for k, ids in zip(where, coca_greedy(self._model, batch, self.seq_len)):
                text = decode_tokens(self._tokenizer, ids)
                results[k] = text if text else ValueError("CoCa produced an empty caption")
            self.stats["images"] += len(images)
        return results

    def endpoint_caption(self, keyframes: list[bytes], frame_caption: str | None) -> tuple[str, str, str | None]:
        """(caption, source, error of the merge step or None) of one clip via the endpoint."""
        if frame_caption is None:
            images = keyframes if self.frames == "all" else [keyframes[len(keyframes) // 2]]
            frame_caption = self._client.complete(self.prompt, images, self.stats)
            self.stats["images"] += len(images)
        if not self.merge:
            return frame_caption, self.frame_source, None
        try:
            video_caption = self._client.complete(self.video_prompt, keyframes, self.stats)
            merged = self._client.complete(self.merge_prompt.format(frame_caption=frame_caption,
                                                                    video_caption=video_caption), [], self.stats)
        except EndpointError as exc:
            # Keep the frame caption: a clip with a caption is worth more than none.
            return frame_caption, self.frame_source, f"merge failed: {exc}"
        return merged, f"merged:{self.frame_source}+{self.endpoint_model}", None

    def __call__(self, batch: Batch) -> Batch:
        if not self._ready:
            self.setup()
        n = len(batch["clip_id"])
        captions: list[str | None] = [None] * n
        sources: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        # Rejected clips and source-error rows are not captioned at all.
        todo = [i for i in range(n) if is_clip_row(batch, i) and is_kept(batch, i)]
        todo_frames = {}
        for i in todo:
            frames = batch["keyframes"][i] or []
            if not frames:
                errors[i] = "ValueError: clip has no keyframes"
            else:
                todo_frames[i] = frames
        frame_captions: dict[int, str] = {}
        if self.clip is not None and todo_frames:
            rows = list(todo_frames)
            try:
                results = self.coca_captions([todo_frames[i][len(todo_frames[i]) // 2] for i in rows])
            except Exception as exc:  # noqa: BLE001 - the batch's forward pass failed
                log.exception("CoCa failed on a batch of %d clips", len(rows))
                results = [exc] * len(rows)
            for i, result in zip(rows, results):
                if isinstance(result, Exception):
                    errors[i] = error_text(result)
                    del todo_frames[i]
                else:
                    frame_captions[i] = result
                    captions[i], sources[i] = result, self.frame_source
        if self.uses_endpoint and todo_frames:
            with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
                futures = {pool.submit(self.endpoint_caption, todo_frames[i], frame_captions.get(i)): i
                           for i in todo_frames}
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    try:
                        captions[i], sources[i], errors[i] = future.result()
                    except Exception as exc:  # noqa: BLE001 - EndpointError or a bug: per clip
                        errors[i] = error_text(exc)
        return {**batch, "caption": captions, "caption_source": sources, "caption_error": errors}
