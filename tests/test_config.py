"""Loading the Coze console's OAuth JSON: every accepted shape and every refusal message."""

import json
import re
import os
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coze_mitm.core import config
from coze_mitm.core.config import ConfigError
from tests.conftest import write_config
from tests.harness import Mitmdump


def test_console_file_loads_with_key_parsed_once(tmp_path, rsa_key):
    app = config.load_oauth_config(write_config(tmp_path, rsa_key, "https://api.coze.cn"))
    assert app.client_id and app.public_key_id
    assert app.private_key.key_size == 2048
    assert app.api_origin.netloc == "api.coze.cn"
    assert "PRIVATE" not in repr(app)


@pytest.mark.parametrize("overrides", [
    {"client_type": "server"},
    {"coze_www_base": None, "coze_domain": "https://www.coze.cn"},
    {"coze_api_base": None},
])
def test_older_console_shapes_accepted(tmp_path, rsa_key, overrides):
    app = config.load_oauth_config(write_config(tmp_path, rsa_key, "https://api.coze.cn", **overrides))
    assert app.api_base == "https://api.coze.cn"


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="Coze console.*save it there.*coze_pat"):
        config.load_oauth_config(tmp_path / "nope.json")


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n  "client_id": "1",\n  oops\n}')
    with pytest.raises(ConfigError, match="line 3"):
        config.load_oauth_config(path)


@pytest.mark.parametrize("client_type", ["pkce", "device", "web"])
def test_non_jwt_app_refused_with_the_needed_type(tmp_path, rsa_key, client_type):
    with pytest.raises(ConfigError, match=r"JWT \(service\)"):
        config.load_oauth_config(write_config(tmp_path, rsa_key, "https://api.coze.cn", client_type=client_type))


@pytest.mark.parametrize("field", ["client_id", "public_key_id", "private_key"])
def test_missing_field_named(tmp_path, rsa_key, field):
    with pytest.raises(ConfigError, match=f"'{field}' is missing"):
        config.load_oauth_config(write_config(tmp_path, rsa_key, "https://api.coze.cn", **{field: None}))


def test_unparsable_key(tmp_path, rsa_key):
    with pytest.raises(ConfigError, match="does not parse as a PEM private key"):
        config.load_oauth_config(write_config(tmp_path, rsa_key, "https://api.coze.cn", private_key="garbage"))


def test_non_rsa_key_refused(tmp_path, rsa_key):
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(ConfigError, match="not an RSA key"):
        config.load_oauth_config(write_config(tmp_path, rsa_key, "https://api.coze.cn", private_key=ec_pem))


@pytest.mark.parametrize("base", ["ftp://api.coze.cn", "api.coze.cn", "https://", "http://[::1"])
def test_api_base_must_be_http_url(tmp_path, rsa_key, base):
    with pytest.raises(ConfigError, match="coze_api_base"):
        config.load_oauth_config(write_config(tmp_path, rsa_key, base))


def test_api_origin_keeps_the_port():
    assert str(config.parse_api_origin("http://127.0.0.1:8790/x")) == "http://127.0.0.1:8790"
    assert str(config.parse_api_origin("https://API.coze.cn:443")) == "https://api.coze.cn"
    assert config.parse_api_origin("https://api.coze.cn:8443") != config.parse_api_origin("https://api.coze.cn")


def test_page_origins_normalised_and_validated():
    assert config.parse_page_origins(" https://Example.org/ , http://localhost:3000,https://x.org:443") == {
        "https://example.org", "http://localhost:3000", "https://x.org"}
    assert config.parse_page_origins("") == frozenset()
    for bad in ("*", "null", "example.org", "https://example.org/path", "https://*.example.org", "ftp://x.org"):
        with pytest.raises(ConfigError, match="coze_origins"):
            config.parse_page_origins(bad)


def test_ipv6_origins_are_written_as_browsers_write_them():
    """A browser sends `Origin: http://[::1]:3000`; the configured origin must be that exact text (it was
    `http://::1:3000`, which no browser sends), and its key the request's own (scheme, host, port)."""
    assert config.parse_page_origins("http://[::1]:3000, https://[2001:DB8::1]") == {
        "http://[::1]:3000", "https://[2001:db8::1]"}
    assert str(config.parse_api_origin("http://[::1]:8000/v1")) == "http://[::1]:8000"
    assert config.origin_key("http://[::1]:3000") == ("http", "::1", 3000)
    assert config.origin_key("https://example.org") == ("https", "example.org", 443)


def test_permissions_warning(tmp_path, rsa_key):
    path = write_config(tmp_path, rsa_key, "https://api.coze.cn")
    assert config.permissions_warning(path) is None
    os.chmod(path, 0o644)
    assert "chmod 600" in config.permissions_warning(path)


def test_default_path_is_in_the_repository_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.DEFAULT_CONFIG_PATH == config.REPO_ROOT / "config" / "coze_oauth_config.json"
    assert (config.REPO_ROOT / "config" / "coze_oauth_config.example.json").is_file()
    json.loads((config.REPO_ROOT / "config" / "coze_oauth_config.example.json").read_text())


def test_websocket_bases_and_the_api_bases_own_ws_host():
    from coze_mitm.core.config import Origin, default_ws_origin, parse_api_origin
    assert str(parse_api_origin("ws://127.0.0.1:9000", websocket=True)) == "ws://127.0.0.1:9000"
    assert str(parse_api_origin("wss://ws.coze.cn/v1/chat", websocket=True)) == "wss://ws.coze.cn"
    with pytest.raises(ConfigError, match="http\\(s\\) URL"):
        parse_api_origin("wss://ws.coze.cn")  # coze_api_base stays http(s)
    assert str(default_ws_origin(parse_api_origin("https://api.coze.cn"))) == "wss://ws.coze.cn"
    assert str(default_ws_origin(parse_api_origin("https://api.coze.com"))) == "wss://ws.coze.com"
    assert default_ws_origin(parse_api_origin("http://127.0.0.1:8888")) is None
    assert default_ws_origin(Origin("https", "api.example.org", 8443)) == Origin("wss", "ws.example.org", 8443)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_config_that_is_not_a_regular_file_refused_at_once(tmp_path, kind):
    # Reading a FIFO nobody writes to would block start-up forever; a device could be read forever.
    if kind == "fifo":
        path = tmp_path / "coze_oauth_config.json"
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    else:
        path = tmp_path
    result = {}

    def load():
        try:
            config.load_oauth_config(path)
        except ConfigError as e:
            result["error"] = str(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(20)  # generous: the refusal is immediate; a hang would be forever
    assert not worker.is_alive(), "loading the config hung"
    assert "not a regular file" in result["error"] and "coze_config" in result["error"]


@pytest.mark.process
def test_mitmdump_with_a_fifo_as_config_exits_with_one_line(tmp_path):
    fifo = tmp_path / "coze_oauth_config.json"
    os.mkfifo(fifo)
    proc = Mitmdump(tmp_path, [f"coze_config={fifo}", "coze_origins=https://chat.example.org"])
    assert proc.run_to_exit(timeout=60) == 1
    errors = [line for line in proc.lines if "not a regular file" in line]
    assert len(errors) == 1 and "a FIFO" in errors[0], proc.output
    assert "listening at" not in proc.output and "Error logged during startup" not in proc.output  # a quiet failing start
    assert "Traceback" not in proc.output


def test_no_mode_warning_on_windows_where_mode_bits_say_nothing(tmp_path, monkeypatch):
    """Windows reports every file as 0o666 (mode bits from the read-only flag only): a mode warning there would
    be said for every config, so it is POSIX only."""
    from coze_mitm.core import config as config_module

    path = tmp_path / "cfg.json"
    path.write_text("{}")
    path.chmod(0o644)
    assert "chmod 600" in config_module.permissions_warning(path)
    monkeypatch.setattr(config_module.os, "name", "nt")
    assert config_module.permissions_warning(path) is None


@pytest.mark.process  # runs mitmweb
def test_mitmweb_with_a_bad_config_exits_with_one_line_and_never_listens(tmp_path):
    """The same quiet start for mitmweb: the coze-mitm line, exit code 1, no proxy or web server started."""
    import mitmproxy.version
    if tuple(int(x) for x in re.findall(r"\d+", mitmproxy.version.VERSION)[:3]) < (11, 1, 2):
        pytest.skip("mitmweb < 11.1.2: coze-mitm refuses it before reading its config (tests/test_local_gate.py)")
    (tmp_path / "coze_oauth_config.json").write_text("{not json")
    proc = Mitmdump(tmp_path, [f"coze_config={tmp_path / 'coze_oauth_config.json'}"], tool="mitmweb",
                    extra_args=["--no-web-open-browser", "--web-port", "0"])
    assert proc.run_to_exit(timeout=60) == 1
    errors = [line for line in proc.lines if "coze-mitm:" in line]
    assert len(errors) == 1 and "not valid JSON" in errors[0], proc.output
    assert "listening at" not in proc.output and "Error logged during startup" not in proc.output
    assert "Traceback" not in proc.output


def test_the_example_config_is_recognised():
    with pytest.raises(ConfigError) as e:
        config.load_oauth_config(config.REPO_ROOT / "config" / "coze_oauth_config.example.json")
    msg = str(e.value)
    assert "this is the example" in msg and "download your app's config from the Coze console" in msg
    assert "OpenSSL" not in msg and "deserialize" not in msg


def test_a_key_without_pem_lines_gets_a_plain_reason(tmp_path, rsa_key):
    with pytest.raises(ConfigError) as e:
        config.load_oauth_config(write_config(tmp_path, rsa_key, "https://api.coze.cn", private_key="garbage"))
    assert "no PEM header line" in str(e.value)
    assert "OpenSSLError" not in str(e.value) and "[<" not in str(e.value)


def test_utf8_bom_accepted(tmp_path, rsa_key):
    """Windows Notepad saves UTF-8 with a byte order mark: the file still loads."""
    path = write_config(tmp_path, rsa_key, "https://api.coze.cn")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    app = config.load_oauth_config(path)
    assert app.client_id and app.api_base == "https://api.coze.cn"
    assert config.parse_oauth_config("\ufeff" + path.read_bytes()[3:].decode()).client_id == app.client_id
