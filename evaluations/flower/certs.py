"""Certificates and SuperNode keys for a Flower deployment with TLS and node authentication
(DESIGN §9), made with the ``cryptography`` package: ``pfedpg-eval flower-certs OUT_DIR``.

Writes into ``OUT_DIR``:

* ``ca.crt`` / ``ca.key`` — a self-signed certificate authority (keep ``ca.key`` off the nodes);
* ``server.pem`` / ``server.key`` — the SuperLink's certificate for ``--host`` names and addresses,
  signed by the CA (``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``);
* ``node<i>.key`` / ``node<i>.pub`` — one EC P-384 key pair per SuperNode in OpenSSH format (the
  private key stays on its node: ``flower-supernode --auth-supernode-private-key node<i>.key``;
  the public key is registered with ``flwr supernode register node<i>.pub``).

Good for a test federation or a first deployment; an organisation with its own PKI uses its own.

:func:`superlink_args` / :func:`supernode_args` are the flags that use these files, the one source of
the commands the toolkit starts (:class:`~evaluations.flower.local.Federation`) and prints
(:func:`deployment_commands`, after ``flower-certs``): given certificates, the SuperLink always runs
with ``--enable-supernode-auth``. Without it a TLS SuperLink admits any SuperNode that dials
without a key (Flower 1.42 lets such a node register itself); a node *with* a key is refused
unless the key was registered, auth or not, so such a node proves nothing about auth.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import re
import shlex
from pathlib import Path

import click

from pfedpg.errors import ConfigError


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _check_host(h: str) -> None:
    """An IP address or a DNS name a node can dial; anything else is one line, before any file is written."""
    try:
        ipaddress.ip_address(h)
        return
    except ValueError:
        pass
    if not h or len(h) > 253 or not all(_LABEL.match(label) for label in h.rstrip(".").split(".")):
        raise ConfigError(f"flower-certs --host {h!r} is neither an IP address nor a DNS name (letters, digits and "
                          "hyphens, dot-separated labels of 1-63 characters); pass the name the SuperNodes dial")


def _check_certificate_args(out: Path, hosts, nodes) -> None:
    if not hosts:
        raise ConfigError("flower-certs needs at least one --host (the name or address the nodes dial)")
    for h in hosts:
        _check_host(h)
    if not isinstance(nodes, int) or nodes < 0:
        raise ConfigError(f"flower-certs --nodes={nodes!r} must be a non-negative integer")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"flower-certs: {str(out)!r} is a file; choose a directory")
    existing = [p.name for p in (out / "ca.key", out / "server.key") if p.exists()]
    if existing:
        raise ConfigError(f"flower-certs: {out / existing[0]} exists and keys are never overwritten; "
                          "choose a directory without ca.key / server.key")


def _ca_and_server(hosts, days: int):
    """A self-signed CA (ECDSA P-384) and a SuperLink certificate it signs for ``hosts`` (IP or DNS names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfedpg-eval federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
          .not_valid_after(now + _dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
           .add_extension(x509.SubjectAlternativeName(names), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    return ca_key, ca, srv_key, srv


def make_certificates(out: str | Path, *, hosts: list[str] | tuple[str, ...] = ("127.0.0.1", "localhost"),
                      nodes: int = 0, days: int = 365) -> dict[str, Path]:
    """Write a CA, a SuperLink certificate valid for ``hosts`` and ``nodes`` SuperNode key pairs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    _check_certificate_args(out, hosts, nodes)
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    no_pw = serialization.NoEncryption()
    ca_key, ca, srv_key, srv = _ca_and_server(hosts, days)
    files = {
        "ca_cert": _write(out / "ca.crt", ca.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw),
                         private=True),
        "server_cert": _write(out / "server.pem", srv.public_bytes(pem)),
        "server_key": _write(out / "server.key", srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw),
                             private=True),
    }
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"node{i}_key"] = _write(out / f"node{i}.key", key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, no_pw), private=True)
        files[f"node{i}_pub"] = _write(out / f"node{i}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return files


def superlink_args(certs: str | Path | None) -> list[str]:
    """``flower-superlink``'s security flags: TLS with ``certs``' server certificate and SuperNode
    authentication (only keys registered with ``flwr supernode register`` get in); ``None``:
    plaintext, every node admitted (``--insecure``; Flower refuses node auth without TLS)."""
    if certs is None:
        return ["--insecure"]
    c = Path(certs)
    return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
            "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]


def supernode_args(certs: str | Path | None, node: int) -> list[str]:
    """``flower-supernode``'s security flags for node ``node``: the CA that signed the SuperLink's
    certificate and the node's private key (``certs/node<node>.key``); ``None``: ``--insecure``."""
    if certs is None:
        return ["--insecure"]
    c = Path(certs)
    return ["--root-certificates", str(c / "ca.crt"), "--auth-supernode-private-key", str(c / f"node{node}.key")]


def deployment_commands(certs: str | Path, host: str, nodes: int, port: int = 8000) -> list[str]:
    """The deployment steps 2-4 of docs/how-to/flower.md for ``certs`` (what ``pfedpg-eval flower-certs`` prints)."""
    address, c = f"{host}:{port}", Path(certs)
    lines = ["next steps (docs/how-to/flower.md, \"A deployment\"):",
             "  server:   " + shlex.join(["flower-superlink", *superlink_args(c)]),
             f"  register: with [superlink.fed] address = \"{address}\", root-certificates = \"{c / 'ca.crt'}\" "
             "in FLWR_HOME/config.toml, on a machine that reaches the SuperLink:"]
    lines += [f"            {shlex.join(['flwr', 'supernode', 'register', str(c / f'node{n}.pub'), 'fed'])}"
              for n in range(nodes)]
    lines += [f"  node {n}:   " + shlex.join(["flower-supernode", *supernode_args(c, n), "--superlink", address,
                                              "--node-config", f"partition-id={n} data-path=<its records>"])
              for n in range(nodes)]
    if not nodes:
        lines.append("  (no node keys: --nodes N makes one pair per SuperNode; only registered keys get in)")
    return lines


__all__ = ["deployment_commands", "make_certificates", "superlink_args", "supernode_args"]


# ------------------------------------------------------------------------------------------------
# pfedpg-eval flower-certs (registered on the CLI group in evaluations/cli.py)


@click.command("flower-certs", short_help="Make a CA, a SuperLink certificate and SuperNode keys (TLS deployment).",
             epilog="Example: pfedpg-eval flower-certs certs --host link.example.org --nodes 3")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--host", multiple=True, metavar="NAME",
              help="a name or IP address the SuperNodes dial (repeatable; default 127.0.0.1 and localhost)")
@click.option("--nodes", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="SuperNode key pairs to make")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True, metavar="D",
              help="validity in days")
def command(out_dir: str, host: tuple[str, ...], nodes: int, days: int) -> int:
    """Make a CA, a SuperLink certificate and SuperNode keys for a TLS deployment.

    Writes ca.crt/ca.key, server.pem/server.key (the SuperLink's certificate for every --host) and
    node<i>.key/node<i>.pub (SuperNode authentication keys, OpenSSH EC P-384) into OUT_DIR, and prints the commands
    that use them (SuperLink with TLS and --enable-supernode-auth; docs/how-to/flower.md, "A deployment")."""
    hosts = list(host) or ["127.0.0.1", "localhost"]
    files = make_certificates(out_dir, hosts=hosts, nodes=nodes, days=days)
    print("\n".join([f"{name}: {path}" for name, path in files.items()]
                    + deployment_commands(out_dir, hosts[0], nodes)))
    return 0
