"""A real SMTP server for tests/smtp_tls.rs: aiosmtpd on 127.0.0.1, port chosen by the
system, with a throwaway CA and server certificate made by openssl.

    server.py DIR (starttls|implicit|plain) [--login USER:PASSWORD] [--stall]

Prints one JSON line {"port": N, "ca": PATH} once listening, then one JSON line per
accepted message: mail_from, rcpt_tos, tls (the session was encrypted), login, data.
--stall never answers RCPT TO (a server that hangs before it takes the message). Exits when stdin closes.
"""

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def certificates(folder):
    """CA and a server certificate for IP 127.0.0.1 signed by it; returns paths."""
    ca, ca_key = os.path.join(folder, "ca.pem"), os.path.join(folder, "ca.key")
    cert, key = os.path.join(folder, "server.pem"), os.path.join(folder, "server.key")
    csr, ext = os.path.join(folder, "server.csr"), os.path.join(folder, "server.ext")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=os-credits throwaway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext)
    return ca, cert, key


class Handler:
    def __init__(self, stall):
        self.stall = stall

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.stall:
            await asyncio.sleep(3600)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        print(json.dumps({
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": session.ssl is not None
            or server.transport.get_extra_info("ssl_object") is not None,
            "login": login,
            "data": envelope.content.decode("utf-8", "replace"),
        }), flush=True)
        return "250 OK: queued"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("mode", choices=["starttls", "implicit", "plain"])
    parser.add_argument("--login")
    parser.add_argument("--stall", action="store_true")
    args = parser.parse_args()
    ca, cert, key = certificates(args.dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    authenticator = None
    if args.login:
        user, password = args.login.split(":", 1)

        def authenticator(server, session, envelope, mechanism, data):
            ok = isinstance(data, LoginPassword) and data.login.decode() == user \
                and data.password.decode() == password
            return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def protocol():
        return SMTP(
            Handler(args.stall),
            hostname="smtp.test",
            require_starttls=args.mode == "starttls",
            tls_context=context if args.mode == "starttls" else None,
            authenticator=authenticator,
            auth_required=authenticator is not None,
            auth_require_tls=args.mode != "plain",
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        protocol, "127.0.0.1", 0, ssl=context if args.mode == "implicit" else None)
    print(json.dumps({"port": server.sockets[0].getsockname()[1], "ca": ca}), flush=True)
    # Serve until the test closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
