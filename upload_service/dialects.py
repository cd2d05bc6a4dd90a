"""Which resumable protocol a request speaks (tus 1.0.0 or the IETF draft's interop version),
and the choices that differ between them: the headers every answer carries, how a client says
an upload is complete and when it is, an append's media type, tus' method override.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from upload_service import tus
from upload_service.asgi import Scope, header, list_header
from upload_service.storage import UploadInfo

Headers = list[tuple[bytes, bytes]]

RESUMABLE_PATH_RE = re.compile(r"/files(?:/[^/]*)?")  # /files, /files/ and /files/<id>: where tus is spoken


@dataclass(frozen=True)
class Dialect:
    """Which protocol a request speaks: tus (draft None) or the IETF draft's interop version."""

    draft: str | None

    @classmethod
    def of(cls, scope: Scope) -> Dialect:
        return cls(tus.draft_version(list_header(scope, b"upload-draft-interop-version")))

    @classmethod
    def spoken(cls, scope: Scope) -> Dialect | None:
        """The protocol a request says it speaks (the draft's header, or Tus-Resumable), if any."""
        dialect = cls.of(scope)
        return dialect if dialect.draft is not None or list_header(scope, b"tus-resumable") is not None else None

    @property
    def interop(self) -> int:
        """The draft's interop version as a number; 0 for tus."""
        return int(self.draft) if self.draft is not None else 0

    @property
    def completes_at_length(self) -> bool:
        """Whether an upload whose offset reaches its length is complete: in tus, and in interop
        versions 3 to 6 as tusd does it (tus-js-client's draft mode, which sends version 6, says ?0
        on a stream's last PATCH). Versions 7 on wait for Upload-Complete ?1, as the draft says."""
        return self.interop <= 6

    @property
    def append_media_type(self) -> str | None:
        """The media type a PATCH body must have; None: any (interop versions 3 to 5 named none)."""
        if self.draft is None:
            return tus.TUS_CONTENT_TYPE
        return tus.DRAFT_CONTENT_TYPE if self.interop >= 6 else None

    @property
    def replays_final_answer(self) -> bool:
        """Whether an empty append at the end of a stored upload gets the answer that stored it again:
        versions 3 to 6 (whose "complete" may come after the append that stored it) and, as drafts
        -12 on allow, 9 (a client whose final answer was lost)."""
        return self.completes_at_length or self.interop >= 9

    @property
    def refusals_say_incomplete(self) -> bool:
        """Whether a refusal says `Upload-Complete: ?0`: drafts -06 to -08 (version 7: "any response,
        successful or not", to a request that did not complete the upload), and -12 on (version 9:
        ?1 is the uploaded file's answer, ?0 the protocol's)."""
        return self.interop == 7 or self.interop >= 9

    @property
    def completed_upload_status(self) -> int | None:
        """The status of the `completed-upload` problem, to an append to a stored upload: 400 in
        drafts -01 to -08 (versions 3 to 7), 410 in -09 to -11 (8); -12 on (9) dropped the type."""
        return 400 if self.interop <= 7 else 410 if self.interop == 8 else None

    @property
    def gets_offset(self) -> bool:
        """Drafts -12 on (version 9): a GET of an upload retrieves its offset, as a HEAD does."""
        return self.interop >= 9

    def will_complete(self, scope: Scope, appending: bool) -> bool | None:
        """Whether the draft's client says this request ends the upload (None: tus, which does not say).

        Interop version 3 (draft -01, Apple's URLSession since iOS 17) says the opposite,
        `Upload-Incomplete`, and a PATCH without it is the last.
        """
        if self.draft is None:
            return None
        if self.draft == "3":
            text = list_header(scope, b"upload-incomplete")
            return True if text is None and appending else not tus.parse_boolean(text, "Upload-Incomplete")
        return tus.parse_boolean(list_header(scope, b"upload-complete"), "Upload-Complete")

    def completeness(self, complete: bool) -> tuple[bytes, bytes]:
        """The draft's header saying whether the upload is complete, in this version's words."""
        if self.draft == "3":
            return b"upload-incomplete", tus.format_boolean(not complete)
        return b"upload-complete", tus.format_boolean(complete)

    def headers(self) -> Headers:
        if self.draft is not None:
            return [(b"upload-draft-interop-version", self.draft.encode())]
        return [(b"tus-resumable", tus.TUS_VERSION.encode())]

    def refusal_headers(self) -> Headers:
        """The headers of a refusal: the protocol's, and `Upload-Complete: ?0` where the version says
        so (`refusals_say_incomplete`: 7 and 9)."""
        headers = self.headers()
        if self.refusals_say_incomplete:
            headers.append(self.completeness(False))
        return headers


def protocol_headers(scope: Scope, refusal: bool = False) -> Headers:
    """For an answer outside the resumable handlers (a 405, a stored file's DELETE): the
    protocol's headers (`refusal`: a refusal's) when the request speaks tus or the draft, none otherwise."""
    dialect = Dialect.spoken(scope)
    if dialect is None:
        return []
    return dialect.refusal_headers() if refusal else dialect.headers()


def method_override(scope: Scope, path: str) -> str | None:
    """The method a POST to `/files` or `/files/<id>` names in X-HTTP-Method-Override, if any.

    tus 1.0.0 core: the header "MUST be interpreted as the request's method", for clients
    that cannot send PATCH or DELETE (tus-js-client's overridePatchMethod). Only on the
    tus routes, as tusd, which serves nothing else, honours it on a POST.
    """
    if scope["method"] != "POST" or not RESUMABLE_PATH_RE.fullmatch(path):
        return None
    method = (header(scope, b"x-http-method-override") or "").strip()
    if method in ("", "POST"):
        return None
    # The methods a client cannot send otherwise, and that read the body (a GET or OPTIONS
    # would answer without reading it, a HEAD without the body a POST's answer announces).
    if method not in ("PATCH", "DELETE"):
        raise tus.InvalidHeader(f"X-HTTP-Method-Override may name PATCH or DELETE, not {method[:20]!r}")
    return method


def completes(info: UploadInfo, will_complete: bool | None, dialect: Dialect) -> bool:
    """Whether this request ends the upload: its client says so (`Dialect.will_complete`), or its
    offset is at its length where that completes it (`Dialect.completes_at_length`)."""
    return bool(will_complete) or (dialect.completes_at_length and info.complete)
