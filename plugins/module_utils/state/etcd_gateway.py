# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Requests to etcd's JSON gateway (/v3/) through etcd3gw, with endpoint failover, TLS and auth.

etcd3gw talks to one host; ``EtcdGateway`` keeps one etcd3gw client per endpoint, sticks to the last
one that answered and moves on to the next when one does not answer. etcd3gw 2.0.0 has no
authentication, so a token from ``auth/authenticate`` is sent as the ``Authorization`` header.
"""

import base64
import importlib.util
import json
import os
import re

from urllib.parse import urlsplit

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import (
    InvalidInput,
    MissingLibrary,
    StoreAuthError,
    StoreError,
    StoreUnreachable,
)

# etcd3gw brings requests, urllib3 and pbr (which reads etcd3gw's version through importlib_metadata, or through
# pkg_resources where that backport is missing): 0.1-0.2 s of a module's start-up. Here it is only looked for;
# it is imported when the first EtcdGateway is made (``load_etcd3gw``), so code that never reaches etcd (helpers
# such as b64, a task failing on its input) does not pay for it.
HAS_ETCD3GW = importlib.util.find_spec("etcd3gw") is not None
etcd3gw_exceptions = None
Etcd3Client = None


def load_etcd3gw():
    """Import etcd3gw's client and exceptions once; MissingLibrary when it is absent or cannot be imported."""
    global etcd3gw_exceptions, Etcd3Client  # noqa: PLW0603 - the module-level names, bound on first use
    missing = "the etcd3gw Python library is required to use the etcd state store"
    if not HAS_ETCD3GW:
        raise MissingLibrary(missing, library="etcd3gw")
    if Etcd3Client is not None:
        return
    try:
        from etcd3gw import exceptions  # noqa: PLC0415 - see HAS_ETCD3GW
        from etcd3gw.client import Etcd3Client as client_class  # noqa: PLC0415
    except ImportError as error:
        raise MissingLibrary("%s (%s)" % (missing, error), library="etcd3gw") from None
    etcd3gw_exceptions, Etcd3Client = exceptions, client_class


API_PATH = "/v3/"  # etcd >= 3.4; etcd3gw 2.0.0 defaults to the older /v3alpha/
DEFAULT_PORT = 2379
SCHEMES = ("http", "https")

# gRPC status codes that etcd's gateway reports in {"code": N}.
_UNAVAILABLE_CODES = (4, 14)  # DeadlineExceeded, Unavailable: this member cannot serve now
_AUTH_CODES = (7, 16)  # PermissionDenied, Unauthenticated
_AUTH_MESSAGES = ("user name is empty", "authentication failed", "invalid auth token", "permission denied")
_TOKEN_EXPIRED = "invalid auth token"  # noqa: S105 - an etcd error text, not a secret


class Endpoint:
    """One etcd client URL, split into scheme, host and port."""

    def __init__(self, scheme, host, port):
        self.scheme = scheme
        self.host = host
        self.port = port

    @property
    def url(self):
        """The normalised URL, e.g. ``https://[::1]:2379``."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d" % (self.scheme, host, self.port)

    def __eq__(self, other):
        return isinstance(other, Endpoint) and self.url == other.url

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.url)

    def __repr__(self):
        return "Endpoint(%r)" % self.url


def parse_endpoint(text, tls=False):
    """An Endpoint from ``http(s)://host[:port]``, ``host[:port]`` or ``[v6]:port``.

    Without a scheme the endpoint is https when ``tls`` (a CA or client certificate is set), else http.
    """
    allowed = "http(s)://HOST[:PORT], HOST[:PORT] or [IPV6]:PORT"
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("etcd endpoint %r is empty; expected %s" % (text, allowed), endpoint=text, allowed=allowed)
    raw = text.strip()
    if "://" not in raw:
        raw = "%s://%s" % ("https" if tls else "http", raw)
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as error:
        raise InvalidInput(
            "etcd endpoint %r is not a URL (%s); expected %s" % (text, error, allowed), endpoint=text, allowed=allowed
        ) from None
    if parts.scheme not in SCHEMES or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise InvalidInput(
            "etcd endpoint %r is not valid; expected %s" % (text, allowed), endpoint=text, allowed=allowed
        )
    return Endpoint(parts.scheme, parts.hostname, port or DEFAULT_PORT)


def parse_endpoints(texts, tls=False):
    """Endpoints from a list of URLs (duplicates dropped, order kept); at least one."""
    if isinstance(texts, str):
        texts = [part for part in texts.split(",") if part.strip()]
    endpoints = []
    for text in texts or []:
        endpoint = parse_endpoint(text, tls=tls)
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    if not endpoints:
        raise InvalidInput("etcd_endpoints is empty; give at least one etcd client URL", etcd_endpoints=texts)
    return endpoints


def b64(data):
    """Base64 text of ``data`` (str as UTF-8, or bytes) as the gateway wants keys and values."""
    if not isinstance(data, bytes):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    """The bytes behind a gateway base64 field."""
    return base64.b64decode(text or "")


def range_end(prefix):
    """The key just past every key starting with ``prefix`` (etcd's range_end for a prefix)."""
    data = bytearray(prefix.encode("utf-8") if not isinstance(prefix, bytes) else prefix)
    while data and data[-1] == 0xFF:
        data.pop()
    if not data:
        return b"\0"  # every key
    data[-1] += 1
    return bytes(data)


def _short_reason(text):
    """The useful tail of a requests/urllib3 error ("[Errno 111] Connection refused", "timed out")."""
    text = text or ""
    for pattern in (r"\[SSL[^\]]*\][^'\")]*", r"\[Errno -?\d+\][^'\")]*", r"[Rr]ead timed out"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip().rstrip(".")
    return text.strip()[:200] or "no answer"


def _is_tls_failure(text):
    """True when a connection error was the TLS handshake (bad CA, bad client certificate)."""
    return "SSL" in (text or "") or "certificate" in (text or "").lower()


def _etcd_error(text):
    """``(code, message)`` of an etcd gateway error body; code None when it is not etcd's JSON."""
    try:
        body = json.loads(text)
        return body.get("code"), body.get("message") or body.get("error") or text
    except (TypeError, ValueError, AttributeError):
        return None, (text or "").strip()


class _EndpointDown(Exception):
    """This endpoint did not answer; the next one may."""

    def __init__(self, reason, tls=False):
        super().__init__(reason)
        self.reason = reason
        self.tls = tls


class EtcdGateway:
    """POSTs JSON to etcd's gateway on the first endpoint that answers; no I/O until the first call."""

    def __init__(self, endpoints, *, ca_cert=None, cert=None, key=None, user=None, password=None, timeout=10):
        load_etcd3gw()
        tls = bool(ca_cert or cert)
        self.endpoints = parse_endpoints(endpoints, tls=tls)
        self._check_files(etcd_ca_cert=ca_cert, etcd_cert=cert, etcd_key=key)
        if key and not cert:
            raise InvalidInput("etcd_key is set without etcd_cert; give both or neither", etcd_key=key)
        if bool(user) != bool(password):
            raise InvalidInput("etcd_user and etcd_password go together; give both or neither", etcd_user=user)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidInput("etcd_timeout %r is not valid; expected seconds > 0" % (timeout,), etcd_timeout=timeout)
        self._config = dict(ca_cert=ca_cert, cert=cert, key=key, user=user, password=password, timeout=timeout)
        self.timeout = timeout
        self._options = {"timeout": timeout}
        if ca_cert:
            # Per request: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's verify.
            self._options["verify"] = ca_cert
        self._clients = {}
        self._current = 0

    @staticmethod
    def _check_files(**paths):
        """InvalidInput naming the option when a TLS file does not exist."""
        for option, path in sorted(paths.items()):
            if path and not os.path.isfile(path):
                raise InvalidInput("%s %s does not exist or is not a file" % (option, path), **{option: path})

    def clone(self):
        """A gateway with the same settings and its own HTTP sessions (for another thread)."""
        return EtcdGateway([endpoint.url for endpoint in self.endpoints], **self._config)

    @property
    def endpoint(self):
        """The endpoint the next request goes to first."""
        return self.endpoints[self._current]

    def call(self, path, payload):
        """POST ``payload`` to ``/v3/<path>`` and return the decoded answer, failing over between endpoints."""
        failures = []
        count = len(self.endpoints)
        for offset in range(count):
            index = (self._current + offset) % count
            try:
                answer = self._call_endpoint(index, path, payload)
            except _EndpointDown as down:
                failures.append((self.endpoints[index], down))
                continue
            self._current = index
            return answer
        raise self._unreachable(failures)

    def _unreachable(self, failures):
        """StoreUnreachable (or StoreAuthError when TLS failed) naming every endpoint tried and why."""
        tried = [endpoint.url for endpoint, _down in failures]
        reasons = {endpoint.url: down.reason for endpoint, down in failures}
        listing = "; ".join("%s: %s" % (url, reasons[url]) for url in tried)
        if any(down.tls for _endpoint, down in failures):
            return StoreAuthError("TLS handshake with etcd failed (%s)" % listing, endpoints=tried, errors=reasons)
        return StoreUnreachable("no etcd endpoint answered (%s)" % listing, endpoints=tried, errors=reasons)

    def _client(self, index):
        """The etcd3gw client of endpoint ``index``, created (and authenticated) on first use."""
        client = self._clients.get(index)
        if client is None:
            endpoint = self.endpoints[index]
            config = self._config
            client = Etcd3Client(
                host=endpoint.host,
                port=endpoint.port,
                protocol=endpoint.scheme,
                ca_cert=config["ca_cert"],
                cert_key=config["key"],
                cert_cert=config["cert"],
                api_path=API_PATH,
            )
            if config["cert"] and not config["key"]:
                client.session.cert = config["cert"]  # one PEM holding certificate and key
            if config["user"]:
                self._authenticate(client, endpoint)
            self._clients[index] = client
        return client

    def _authenticate(self, client, endpoint):
        """Get a token for etcd_user from this endpoint and send it with every later request."""
        client.session.headers.pop("Authorization", None)
        body = {"name": self._config["user"], "password": self._config["password"]}
        answer = self._post(client, endpoint, "auth/authenticate", body)
        token = answer.get("token")
        if not token:
            raise StoreAuthError(
                "etcd at %s gave no token for user %s; is authentication enabled?" % (endpoint.url, body["name"]),
                endpoint=endpoint.url,
                user=body["name"],
            )
        client.session.headers["Authorization"] = token

    def _call_endpoint(self, index, path, payload):
        """One request to endpoint ``index``; a token that expired is renewed once."""
        endpoint = self.endpoints[index]
        client = self._client(index)
        try:
            return self._post(client, endpoint, path, payload)
        except StoreAuthError as error:
            if not (self._config["user"] and _TOKEN_EXPIRED in error.msg):
                raise
        self._authenticate(client, endpoint)
        return self._post(client, endpoint, path, payload)

    def _post(self, client, endpoint, path, payload):
        """POST through etcd3gw and translate its exceptions into typed errors."""
        try:
            return client.post(client.get_url(path), json=payload, **self._options)
        except (etcd3gw_exceptions.ConnectionFailedError, etcd3gw_exceptions.ConnectionTimeoutError) as error:
            code, message = _etcd_error(error.detail_text)
            if code is not None:  # a 503 from a member that cannot serve (no leader, timed out)
                raise _EndpointDown(message) from error
            text = error.detail_text or str(error)
            raise _EndpointDown(_short_reason(text), tls=_is_tls_failure(text)) from error
        except etcd3gw_exceptions.Etcd3Exception as error:
            raise self._request_error(endpoint, path, error) from error
        except ValueError as error:  # an answer that is not JSON: not an etcd gateway
            raise _EndpointDown("answer is not JSON (%s); is this an etcd client URL?" % error) from error

    def _request_error(self, endpoint, path, error):
        """The typed error for an answer other than 200 from a reachable endpoint."""
        reason = error.args[0] if error.args else ""
        code, message = _etcd_error(error.detail_text)
        if code in _UNAVAILABLE_CODES:
            return _EndpointDown(message)
        if code in _AUTH_CODES or any(text in (message or "") for text in _AUTH_MESSAGES):
            return StoreAuthError(
                "etcd at %s refused the request: %s" % (endpoint.url, message),
                endpoint=endpoint.url,
                user=self._config["user"],
            )
        if code is None and reason == "Not Found":
            return _EndpointDown("no etcd v3 JSON gateway at %s%s" % (API_PATH, path))
        return StoreError(
            "etcd at %s failed %s: %s" % (endpoint.url, path, message or reason), endpoint=endpoint.url, code=code
        )
