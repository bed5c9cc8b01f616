"""What looks like a secret, and the same text with it masked: the one place that decides.

Masked wherever a setting's value may be repeated (errors, logs, ``config.json``, a sink's copy of
the config, the ``--set`` arguments an error or a resume command quotes):

- the value of a setting named like a secret (``api_key``, ``hf_token``, ``password``...): whole;
- an API key: a known vendor prefix (``fw_``, ``sk-``, ``hf_``, ``ghp_``, ``AKIA``...) followed
  by key characters, or a long run of letters and digits as random as a key (>= 20 characters,
  high Shannon entropy, frequent switches between lower case, upper case and digits): ``fw_***``
  or ``***`` in a message; a setting's value that is a key is ``***`` as a whole;
- the password in a URL's user-info (``http://user:***@host``) and secret query parameters
  (``?api_key=***``).

In a setting's value only a whole key is masked, so that paths and names still work when
``config.json`` is read back (``preftune export``). Hex strings are not keys in free text: commit
ids, ``data_sha256`` and run ids are hex, and worth reading; in a setting that names where a key
is found (``api_key_env``) a W&B key (40 hex digits) counts. Model ids, paths, URLs without
user-info and environment variable names (``FIREWORKS_API_KEY``, ``MY_TINKER_KEY_2``) are left
as they are.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

MASK = "***"
KEY_PREFIXES = ("github_pat_", "wandb_v1_", "fw_", "fw-", "tml-", "sk-", "sk_", "hf_", "ghp_", "gho_",
                "ghu_", "ghs_", "ghr_", "glpat-", "xoxb-", "xoxp-", "xoxa-", "AKIA", "AIza")
KEY_CHARS = r"A-Za-z0-9_\-"
PREFIXED = re.compile(rf"(?<![{KEY_CHARS}])({'|'.join(map(re.escape, KEY_PREFIXES))})([{KEY_CHARS}]{{10,}})")
RANDOM_RUN = re.compile(r"(?<![A-Za-z0-9+=])[A-Za-z0-9+=]{20,}(?![A-Za-z0-9+=])")
USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/?#@:]*)(?::(?P<pw>[^\s/?#@]*))?@")
# the name of a secret, as a setting or a query parameter: a word of it, not a part of a word
# (tokenizer_model and max_tokens are not secrets); names of where one is kept (..._env, ..._file)
SECRET_NAME = re.compile(r"(?:^|[_\-.])(api_?key|apikey|token|secret|password|passwd|passphrase|"
                         r"credentials?)(?:$|[_\-.])", re.IGNORECASE)
HOLDER_SUFFIXES = ("_env", "_file", "_path", "_cmd")
QUERY_SECRET = re.compile(r"(?P<name>[?&](?:[A-Za-z0-9_\-]*[_\-])?(?:api_?key|apikey|token|secret|password|"
                          r"passwd|sig|signature|key))=(?P<value>[^&\s#'\"]+)", re.IGNORECASE)
HEX_KEY = re.compile(r"[0-9a-f]{40}")  # a W&B API key
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def looks_like_key(value: str) -> bool:
    """Whether ``value``, all of it, is shaped like an API key: a known prefix and key
    characters, or a long random run of letters and digits (not hex: hashes are not keys)."""
    value = value.strip()
    found = PREFIXED.fullmatch(value)
    if found is not None and _random_enough(found.group(2)):
        return True
    return RANDOM_RUN.fullmatch(value) is not None and is_random(value)


def looks_like_secret(value: str) -> bool:
    """Whether ``value`` is shaped like a key where a setting should name one (``api_key_env``):
    :func:`looks_like_key`, or a W&B key (40 hex digits)."""
    return looks_like_key(value) or HEX_KEY.fullmatch(value.strip()) is not None


def secret_hint(value: str) -> str:
    """What a key is, without any of it but its vendor's public prefix: ``fw_…, 51 characters``."""
    value = value.strip()
    if HEX_KEY.fullmatch(value):
        return "40 hex digits, as a W&B key"
    prefix = next((p for p in KEY_PREFIXES if value.startswith(p)), "")
    return f"{prefix}…, {len(value)} characters" if prefix else f"{len(value)} characters"


def is_random(run: str) -> bool:
    """A run of letters and digits as random as a key: letters and digits both, not only hex,
    high Shannon entropy, and the character class (lower, upper, digit) switching often, where
    words and names switch only at their boundaries."""
    if not (any(c.isalpha() for c in run) and any(c.isdigit() for c in run)):
        return False
    if re.fullmatch(r"[0-9a-f]+|[0-9A-F]+", run):
        return False
    classes = [_char_class(c) for c in run]
    switches = sum(a != b for a, b in zip(classes, classes[1:])) / (len(run) - 1)
    return switches >= 0.35 and entropy(run) >= 3.5


def entropy(text: str) -> float:
    """Shannon entropy of ``text``'s characters, in bits per character."""
    counts, n = Counter(text), len(text)
    return -sum(k / n * math.log2(k / n) for k in counts.values())


def _char_class(c: str) -> int:
    return 0 if c.islower() else 1 if c.isupper() else 2 if c.isdigit() else 3


def _random_enough(rest: str) -> bool:
    """The part after a vendor prefix, as a key's: two digits or more; or 16 characters or more
    with both cases, or with a digit and no separator (``hf_token_name``, ``hf_hub_v2``: names)."""
    digits = sum(c.isdigit() for c in rest)
    long_run = len(rest) >= 16 and (rest.lower() != rest != rest.upper()
                                    or (digits and not re.search(r"[_\-]", rest)))
    return digits >= 2 or long_run


def mask_secrets(text: str) -> str:
    """``text`` (a message) with every secret in it masked: the secrets of URLs
    (:func:`mask_urls`), and keys (``fw_***``, or ``***`` for a key of no known vendor)."""
    text = mask_urls(text)
    text = PREFIXED.sub(lambda m: m[1] + MASK if _random_enough(m[2]) else m[0], text)
    return RANDOM_RUN.sub(lambda m: MASK if is_random(m[0]) else m[0], text)


def mask_urls(text: str) -> str:
    """``text`` with the secrets of its URLs masked: the password of a user-info
    (``http://user:***@host``; a user name that is a key too) and secret query parameters."""
    text = USERINFO.sub(_mask_userinfo, text)
    return QUERY_SECRET.sub(lambda m: f"{m['name']}={MASK}", text)


def _mask_userinfo(found: re.Match[str]) -> str:
    user = MASK if looks_like_secret(found["user"]) else found["user"]  # a token as the user name
    return f"{found['scheme']}{user}:{MASK}@" if found["pw"] is not None else f"{found['scheme']}{user}@"


def is_secret_name(key: str) -> bool:
    """Whether the setting (a dotted key: its last part) holds a secret itself (``api_key``,
    ``wandb.token``); not one that names where a secret is kept (``api_key_env``)."""
    leaf = key.rsplit(".", 1)[-1]
    return SECRET_NAME.search(leaf) is not None and not leaf.lower().endswith(HOLDER_SUFFIXES)


def names_a_secret(key: str) -> bool:
    """Whether the setting names where a secret is kept (``api_key_env``, ``token_file``)."""
    leaf = key.rsplit(".", 1)[-1]
    return SECRET_NAME.search(leaf) is not None and leaf.lower().endswith(HOLDER_SUFFIXES)


def mask_setting(key: str, value: Any) -> Any:
    """A setting's value as it may be shown or written: ``***`` for a secret's own setting, a
    key given where its holder's name belongs, or a value that is a key; else the value with the
    secrets of its URLs masked (a path or a name is kept whole: it must still work when read
    back). Tables and lists are masked item by item; a value already masked is kept."""
    if isinstance(value, dict):
        return {k: mask_setting(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_setting(key, v) for v in value]
    if not isinstance(value, str) or set(value) <= {"*"}:
        return value
    if is_secret_name(key) or looks_like_key(value) or (names_a_secret(key) and looks_like_secret(value)):
        return MASK
    if key.endswith("_env") and names_a_secret(key) and not ENV_NAME.fullmatch(value):
        return MASK  # not a variable's name: perhaps a key of a shape not known here
    return mask_urls(value)
