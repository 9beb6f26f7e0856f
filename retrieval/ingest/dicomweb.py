"""Ingest source: a PACS (or any archive) over DICOMweb, through ``dicomweb-client``.

A source is written ``dicomweb+http(s)://HOST:PORT/PATH`` with optional query parameters
``since=YYYY-MM-DD``, ``modality=CR,DX`` and ``study=UID`` (repeatable); the CLI options build
them. Credentials never travel in the URL (refused when present): they come from settings
(``RETRIEVAL_DICOMWEB_USERNAME``/``_PASSWORD`` or ``_TOKEN``) and are never logged.

Contract:

* :meth:`DicomwebSource.list_items` lists instances with QIDO-RS (studies -> series -> instances)
  and returns one :class:`~retrieval.ingest.sources.SourceItem` per instance with its SOPInstanceUID, so
  the pipeline skips stored instances *before* fetching them: a later sync fetches only what is new.
  A server that refuses the credentials or cannot be reached raises
  :class:`~retrieval.errors.SourceUnavailableError`; nothing has been stored at that point.
* :meth:`DicomwebSource.fetch` retrieves one instance with WADO-RS into a spool folder and returns
  the file's path; it raises for that instance only (the pipeline records a ``fetch`` failure).
* Every request is retried (``dicomweb_retries`` times, exponential backoff) on connection errors,
  408, 429, 502, 503 and 504.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from retrieval.config import Settings
from retrieval.domain.items import SourceItem
from retrieval.domain.metadata import parse_date
from retrieval.errors import InvalidRequestError, SourceUnavailableError

logger = logging.getLogger(__name__)

SCHEME_PREFIX = "dicomweb+"
RETRY_STATUSES = (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.BAD_GATEWAY,
                  HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.GATEWAY_TIMEOUT)


def is_dicomweb(source: object) -> bool:
    return isinstance(source, str) and source.lower().startswith(SCHEME_PREFIX)


@dataclass(frozen=True)
class DicomwebQuery:
    """Where to sync from and which studies: parsed from, and written back to, a source string."""

    base_url: str
    since: dt.date | None = None
    modalities: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()

    @classmethod
    def parse(cls, source: str) -> DicomwebQuery:
        """Parse ``dicomweb+http(s)://host[:port]/path[?since=&modality=&study=]``; errors name the field."""
        if not is_dicomweb(source):
            raise InvalidRequestError(f"{source}: not a dicomweb+http(s):// source", detail={"field": "source"})
        parts = urlsplit(source[len(SCHEME_PREFIX):])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequestError(
                f"{source}: expected dicomweb+http://HOST:PORT/PATH or dicomweb+https://...", detail={"field": "source"}
            )
        if parts.username or parts.password:
            raise InvalidRequestError(
                "credentials in a DICOMweb URL are refused (they would end up in logs and job rows): "
                "set RETRIEVAL_DICOMWEB_USERNAME and RETRIEVAL_DICOMWEB_PASSWORD, or RETRIEVAL_DICOMWEB_TOKEN",
                detail={"field": "source"},
            )
        params = parse_qs(parts.query, keep_blank_values=False)
        unknown = sorted(set(params) - {"since", "modality", "study"})
        if unknown:
            raise InvalidRequestError(
                f"{source}: unknown DICOMweb source parameter(s) {', '.join(unknown)} (use since, modality, study)",
                detail={"field": "source"},
            )
        since = _since(params["since"][-1]) if "since" in params else None
        modalities = _modalities(params.get("modality", []))
        studies = _study_uids(params.get("study", []))
        base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        return cls(base_url=base, since=since, modalities=modalities, studies=studies)

    def narrowed(self, *, since: str | None, modality: str | None, studies: list[str]) -> DicomwebQuery:
        """This query with command-line options added (a later ``since`` wins; lists are merged)."""
        return replace(
            self,
            since=_since(since) if since else self.since,
            modalities=tuple(sorted(set(self.modalities) | set(_modalities([modality] if modality else [])))),
            studies=tuple(dict.fromkeys([*self.studies, *_study_uids(studies)])),
        )

    def source_string(self) -> str:
        """The canonical ``dicomweb+...`` string (what jobs store and logs show; never credentials)."""
        params: list[tuple[str, str]] = []
        if self.since:
            params.append(("since", self.since.isoformat()))
        if self.modalities:
            params.append(("modality", ",".join(self.modalities)))
        params.extend(("study", uid) for uid in self.studies)
        query = f"?{urlencode(params)}" if params else ""
        return f"{SCHEME_PREFIX}{self.base_url}{query}"


def _since(value: str) -> dt.date:
    since = parse_date(value)
    if since is None:
        raise InvalidRequestError(f"since={value!r}: expected YYYY-MM-DD", detail={"field": "since"})
    return since


def _modalities(values: list[str]) -> tuple[str, ...]:
    return tuple(sorted({m.strip().upper() for value in values for m in value.split(",") if m.strip()}))


def _study_uids(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(uid.strip() for value in values for uid in value.split(",") if uid.strip()))


def _tag_value(entry: dict, tag: str) -> str | None:
    """First value of a DICOM JSON attribute (``{"0020000D": {"vr": "UI", "Value": [...]}}``)."""
    values = (entry.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"


class DicomwebSource:
    """A QIDO-RS/WADO-RS connection for one sync (one :class:`DicomwebQuery`)."""

    def __init__(self, query: DicomwebQuery, settings: Settings) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.query = query
        session = requests.Session()
        adapter = HTTPAdapter(pool_maxsize=max(10, settings.dicomweb.fetch_workers))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        headers = {}
        if settings.dicomweb.token.get_secret_value():
            headers["Authorization"] = f"Bearer {settings.dicomweb.token.get_secret_value()}"
        elif settings.dicomweb.username:
            session.auth = (settings.dicomweb.username, settings.dicomweb.password.get_secret_value())
        self.client = DICOMwebClient(
            url=query.base_url, session=session, headers=headers or None, timeout=settings.dicomweb.timeout
        )
        # the client retries connection errors and these statuses, waiting backoff * 2^attempt seconds
        self.client.set_http_retry_params(
            retry=settings.dicomweb.retries > 0,
            max_attempts=settings.dicomweb.retries + 1,
            wait_exponential_multiplier=int(settings.dicomweb.backoff * 1000),
            retriable_error_codes=RETRY_STATUSES,
        )

    # --- listing --------------------------------------------------------------------------------

    def list_items(self) -> list[SourceItem]:
        """Every instance the query selects, as items carrying their UIDs and their WADO-RS URL."""
        items: list[SourceItem] = []
        for study_uid in self._study_uids():
            for series_uid in self._series_uids(study_uid):
                for entry in self._call(
                    "list instances", self.client.search_for_instances,
                    study_instance_uid=study_uid, series_instance_uid=series_uid, get_remaining=True,
                ):
                    sop_uid = _tag_value(entry, SOP_UID)
                    if not sop_uid:
                        continue
                    uri = f"{self.query.base_url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
                    items.append(SourceItem(path=uri, uri=uri, sop_uid=sop_uid, remote=(study_uid, series_uid, sop_uid)))
        logger.info("dicomweb %s: %d instances listed", self.query.source_string(), len(items))
        return items

    def list_series(self) -> list[tuple[SourceItem, list[SourceItem]]]:
        """Series-level items (for the 3-D models: one volume per series) with their instances.

        A series item's ``path`` and ``uri`` are the series' WADO-RS URL and its ``remote`` is
        ``(StudyInstanceUID, SeriesInstanceUID, "")``.
        """
        grouped: dict[tuple[str, str], list[SourceItem]] = {}
        for item in self.list_items():
            assert item.remote is not None
            grouped.setdefault(item.remote[:2], []).append(item)
        series = []
        for (study_uid, series_uid), instances in grouped.items():
            uri = f"{self.query.base_url}/studies/{study_uid}/series/{series_uid}"
            series.append((SourceItem(path=uri, uri=uri, remote=(study_uid, series_uid, "")), instances))
        return series

    def _study_uids(self) -> list[str]:
        filters: dict[str, str] = {}
        if self.query.since:
            filters["StudyDate"] = f"{self.query.since:%Y%m%d}-"
        if not self.query.studies:
            found = self._call("list studies", self.client.search_for_studies, search_filters=filters, get_remaining=True)
            return sorted({uid for entry in found if (uid := _tag_value(entry, STUDY_UID))})
        uids: list[str] = []
        for study_uid in self.query.studies:
            found = self._call(
                "list studies", self.client.search_for_studies,
                search_filters={**filters, "StudyInstanceUID": study_uid}, get_remaining=True,
            )
            uids.extend(uid for entry in found if (uid := _tag_value(entry, STUDY_UID)))
        return list(dict.fromkeys(uids))

    def _series_uids(self, study_uid: str) -> list[str]:
        found = self._call(
            "list series", self.client.search_for_series,
            study_instance_uid=study_uid, fields=["Modality"], get_remaining=True,
        )
        wanted = set(self.query.modalities)
        return sorted({
            uid for entry in found
            if (uid := _tag_value(entry, SERIES_UID))
            and (not wanted or (_tag_value(entry, MODALITY) or "").upper() in wanted)
        })

    def _call(self, what: str, method: Callable[..., list[dict[str, Any]]], **kwargs: Any) -> list[dict[str, Any]]:
        """Run one QIDO-RS call; any failure becomes a :class:`SourceUnavailableError` naming the server."""
        try:
            return method(**kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise SourceUnavailableError(
                    f"DICOMweb server {self.query.base_url} refused the credentials (HTTP {status}) while trying to "
                    f"{what}: check RETRIEVAL_DICOMWEB_USERNAME/PASSWORD or RETRIEVAL_DICOMWEB_TOKEN",
                    detail={"source": self.query.base_url, "http_status": status},
                ) from exc
            raise SourceUnavailableError(
                f"DICOMweb server {self.query.base_url} answered HTTP {status} while trying to {what}",
                detail={"source": self.query.base_url, "http_status": status},
            ) from exc
        except requests.RequestException as exc:
            raise SourceUnavailableError(
                f"DICOMweb server {self.query.base_url} could not be reached to {what} "
                f"({type(exc).__name__}, after retries)",
                detail={"source": self.query.base_url},
            ) from exc

    # --- fetching -------------------------------------------------------------------------------

    def fetch(self, item: SourceItem, spool: Path) -> Path:
        """WADO-RS one instance into ``spool``; returns the file. Raises (for this item only) on failure."""
        assert item.remote is not None, "fetch takes items from list_items"
        study_uid, series_uid, sop_uid = item.remote
        try:
            dataset = self.client.retrieve_instance(study_uid, series_uid, sop_uid)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise SourceUnavailableError(f"WADO-RS answered HTTP {status}") from exc
        except requests.RequestException as exc:
            raise SourceUnavailableError(f"WADO-RS failed ({type(exc).__name__}, after retries)") from exc
        target = spool / f"{sop_uid}.dcm"
        dataset.save_as(target, enforce_file_format=True)
        return target
