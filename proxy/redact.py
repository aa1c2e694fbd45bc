"""URLs fit for a log line: no userinfo (user, password) and no query values.

Config URLs may carry secrets: `redis://:PASSWORD@host:6379/0`, `http://user:pw@10.0.0.5:9400`,
`http://agent:9464?token=...`. Everything that logs or prints a URL, or an error text that may
quote one (httpx puts the URL in its messages), passes it through here first.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

#: A URL inside free text: scheme://, then everything up to whitespace or a quote/bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_url(url: str) -> str:
    """`url` without userinfo and with every query value replaced by `***`.

    `redis://:pw@h:6379/0?x=1` -> `redis://h:6379/0?x=***`. A URL that cannot be parsed
    shows only its scheme.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = "&".join(
            f"{name}=***" if sep else name
            for name, sep, _ in (item.partition("=") for item in parts.query.split("&") if item)
        )
        return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))
    except ValueError:
        return url.split(":", 1)[0] + "://***"


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (for exception messages that quote a URL)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
