"""Validation of outgoing URLs that carry our keys, and of the addresses they reach.

Membridge and worker-agent URLs come from configuration, from membridge's
``/agents`` answer and from worker registrations; they are sent our admin or
agent key and task prompts. Everything here fails closed: a URL is accepted
only in one plain, unambiguous form, so the host we check is the host
``requests``/``urllib3`` will connect to. Every address form is normalised
before it is judged (IPv4-mapped, IPv4-compatible, 6to4, Teredo and NAT64 IPv6
addresses are judged by the IPv4 address they carry too), and the transport
applies the same judgement to the address it actually connects to, so a
hostname cannot resolve around it. Messages never echo a whole URL (it may
carry credentials); they name the part that is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from .errors import ConfigError, InvalidInput, UnsafeURL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 1123 labels; IDNs must be given in their ASCII (xn--) form.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# A base path is a plain prefix such as /membridge: no percent-escapes, so no
# encoded dot segments or slashes can hide in it.
_BASE_PATH = re.compile(r"(?:/[A-Za-z0-9._~:+-]+)*/?")
_SEGMENT = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Characters no legitimate URL of ours contains; parsers disagree about them.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# Cloud metadata services outside the link-local range.
_METADATA = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # Linux connects 0.x.x.x to this host
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:  # ::a.b.c.d (deprecated IPv4-compatible form)
        found.append(ipaddress.IPv4Address(packed[12:]))
    if ip in _NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(packed[12:]))
    elif ip in _NAT64_LOCAL:  # RFC 6052 /48 layout: bits 64-71 are skipped
        found.append(ipaddress.IPv4Address(packed[6:8] + packed[9:11]))
    return found


def _intrinsic_refusal(ip: IPAddress) -> str | None:
    if ip.is_unspecified or ip.is_multicast:
        return "is not a unicast address"
    if ip.is_link_local:
        return "is link-local"
    if ip in _METADATA:
        return "is a cloud metadata service"
    if isinstance(ip, ipaddress.IPv4Address) and (ip in _THIS_NETWORK or ip.is_reserved or ip == ipaddress.IPv4Address("255.255.255.255")):
        return "is not a routable unicast address"
    return None


def address_refusal(ip: IPAddress, allowed: AllowList | None) -> str | None:
    """Why outgoing calls must not reach ``ip`` (None: they may).

    An address, and every IPv4 address it carries, must be unicast and neither
    link-local nor a metadata service, unless the allow-list names its network.
    Loopback and private addresses are fine: agents run on the local network.
    """
    if allowed is not None and allowed.allows_ip(ip):
        return None
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates.extend(embedded_ipv4(ip))
    for candidate in candidates:
        reason = _intrinsic_refusal(candidate)
        if reason is not None:
            shown = str(candidate) if candidate is ip else f"{ip} (carrying {candidate})"
            return f"{shown} {reason}"
    return None


def _is_hostname(host: str) -> bool:
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return False
    # A numeric last label (2130706433, 0x7f.1, 127.1) is an IPv4 address in a
    # form some resolvers accept and the allow-list cannot reason about.
    last = labels[-1]
    return not (last.isdigit() or last.startswith("0x"))


@dataclass(frozen=True)
class AllowList:
    """Hosts and networks outgoing calls may reach (``MEMBRIDGE_ALLOWED_HOSTS``).

    Entries: exact hostnames, IP addresses, CIDR networks (``10.0.0.0/8``) and
    ``*.example.org`` suffixes, which match subdomains but not the bare domain.
    """

    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> AllowList:
        """Parse a comma-separated allow-list; raise ``ConfigError`` on a bad entry."""
        hosts: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in spec.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry.startswith("*."):
                suffix = _normalise_host(entry[2:])
                if not _is_hostname(suffix):
                    raise ConfigError(f"MEMBRIDGE_ALLOWED_HOSTS: bad suffix entry {raw.strip()!r}")
                suffixes.append(suffix)
            elif "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=True))
                except ValueError as exc:
                    raise ConfigError(f"MEMBRIDGE_ALLOWED_HOSTS: bad network {raw.strip()!r}: {exc}") from None
            elif (ip := _parse_ip(_normalise_host(entry))) is not None:
                networks.append(ipaddress.ip_network(ip))
            else:
                host = _normalise_host(entry)
                if not _is_hostname(host):
                    raise ConfigError(f"MEMBRIDGE_ALLOWED_HOSTS: bad host entry {raw.strip()!r}")
                hosts.add(host)
        if not (hosts or suffixes or networks):
            raise ConfigError("MEMBRIDGE_ALLOWED_HOSTS is set but names no host; unset it to allow any host")
        return cls(frozenset(hosts), tuple(suffixes), tuple(networks))

    @classmethod
    def from_env(cls, value: str | None) -> AllowList | None:
        """``None`` (no restriction) when the variable is unset or blank, else ``parse``."""
        if value is None or not value.strip():
            return None
        return cls.parse(value)

    def allows(self, host: str) -> bool:
        """Whether ``host`` (a hostname or IP literal, brackets optional) is allowed."""
        name = _normalise_host(host)
        ip = _parse_ip(name)
        if ip is not None:
            return self.allows_ip(ip)
        if name in self.hosts:
            return True
        return any(name.endswith("." + suffix) for suffix in self.suffixes)

    def allows_ip(self, ip: IPAddress) -> bool:
        """Whether a listed network holds ``ip`` (an IPv4-mapped address counts as its IPv4 address,
        the only embedded form that connects to that very host)."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.networks if c.version == net.version)


def validate_outgoing_url(url: str, allowed: AllowList | None) -> str:
    """Return ``url`` as a normalised base URL (no trailing slash) or raise ``UnsafeURL``.

    Accepted: http or https, a host, an optional valid port and a plain path
    prefix. Refused: credentials, query, fragment, whitespace or backslashes,
    ambiguous numeric hosts (decimal, octal, hex IPv4 forms, zone ids), hosts
    outside ``allowed`` when an allow-list is given, and addresses that
    ``address_refusal`` refuses, in any of their forms (link-local addresses
    and cloud metadata services only when the allow-list names their network).
    """
    if not isinstance(url, str):
        raise UnsafeURL("URL must be a string")
    url = url.strip()
    if not url:
        raise UnsafeURL("URL is empty")
    if _FORBIDDEN.search(url):
        raise UnsafeURL("URL must not contain whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UnsafeURL("URL cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        shown = scheme[:16] or "none"
        raise UnsafeURL(f"URL scheme must be http or https, not {shown!r}")
    if "@" in parts.netloc:
        raise UnsafeURL("URL must not carry credentials (user:password@)")
    if "?" in url or "#" in url:
        raise UnsafeURL("URL must not have a query or fragment")
    raw_host = parts.hostname
    if not raw_host:
        raise UnsafeURL("URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise UnsafeURL("URL port is not a number between 1 and 65535") from None
    if port == 0:
        raise UnsafeURL("URL port is not a number between 1 and 65535")

    host = _normalise_host(raw_host)
    # '%' would be an IPv6 zone id or an escape: neither names one plain host.
    ip = None if "%" in host else _parse_ip(host)
    if ip is None and not _is_hostname(host):
        raise UnsafeURL(f"URL host {host[:64]!r} is not a valid hostname or IP address")
    if allowed is not None and not allowed.allows(host):
        raise UnsafeURL(f"URL host {host!r} is not in MEMBRIDGE_ALLOWED_HOSTS")
    if ip is not None:
        reason = address_refusal(ip, allowed)
        if reason is not None:
            raise UnsafeURL(f"URL host {reason}; list its network in MEMBRIDGE_ALLOWED_HOSTS to allow it")

    path = parts.path
    if not _BASE_PATH.fullmatch(path) or any(seg in (".", "..") for seg in path.split("/")):
        raise UnsafeURL("URL path must be a plain prefix (letters, digits, . _ ~ : + -; no dot segments)")

    netloc = f"[{host}]" if isinstance(ip, ipaddress.IPv6Address) else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return f"{scheme}://{netloc}{path.rstrip('/')}"


def safe_path_segment(value: str, *, what: str = "path segment") -> str:
    """Return ``value`` if it is a safe single path segment, else raise ``InvalidInput``.

    Used for ids taken from clients (project ids in pass-through routes), so no
    client can steer a call to another path or host.
    """
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise InvalidInput(f"{what} must be 1-128 characters of A-Z a-z 0-9 . _ : - (not '.' or '..')")
    return value


def join(base: str, *segments: str) -> str:
    """Append percent-encoded ``segments`` to ``base``; ``join("", ...)`` gives a path.

    Each segment is encoded whole ('/' becomes %2F), and empty, '.' and '..'
    segments are refused because HTTP clients resolve dot segments.
    """
    parts = [base.rstrip("/")]
    for segment in segments:
        if not isinstance(segment, str) or segment in ("", ".", ".."):
            raise InvalidInput("URL path segments must be non-empty and not '.' or '..'")
        parts.append(quote(segment, safe=""))
    return "/".join(parts)
