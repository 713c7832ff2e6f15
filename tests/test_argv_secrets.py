"""Keys off tritonserver's command line: the preload library, the closed default, key files and checks."""
import os
import subprocess
import sys

import pytest

from segllm_edge.errors import ConfigError
from segllm_edge.serving.argv_secrets import ENV_PREFIX, launch_environment, placeholder
from segllm_edge.serving.security import CLOSED_KEY, Exposure, check_key, choose_key, read_key_file

SHOW = ("import os, sys; print(repr(sys.argv[1:])); print(repr(open('/proc/self/cmdline','rb').read()));"
        "print(repr(os.environ.get('SEGLLM_ARGV_SECRET_A'))); print(repr(os.environ.get('LD_PRELOAD')))")


def _run(args, secrets, tmp_path, base=None):
    env = launch_environment({**os.environ, **(base or {})}, secrets, tmp_path)
    return subprocess.run([sys.executable, "-c", SHOW, *args], env=env, capture_output=True, text=True)


def test_placeholders_expand_inside_the_program_only(tmp_path):
    name = ENV_PREFIX + "A"
    run = _run([f"--k=a:h={placeholder(name)},x", placeholder(name), "plain"], {name: "t0ps3cret"}, tmp_path,
               base={"LD_PRELOAD": ""})
    assert run.returncode == 0, run.stderr
    argv, cmdline, leaked, preload = [eval(line) for line in run.stdout.splitlines()]
    assert argv == ["--k=a:h=t0ps3cret,x", "t0ps3cret", "plain"]         # what main() receives
    assert b"t0ps3cret" not in cmdline and placeholder(name).encode() in cmdline   # what ps shows
    assert leaked is None and preload is None                             # children inherit neither


def test_a_missing_secret_stops_the_program(tmp_path):
    env = launch_environment(dict(os.environ), {ENV_PREFIX + "A": "x"}, tmp_path)
    del env[ENV_PREFIX + "A"]
    run = subprocess.run([sys.executable, "-c", "print('ran')", placeholder(ENV_PREFIX + "A")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 97 and "ran" not in run.stdout
    assert "no value in the environment for " + ENV_PREFIX + "A" in run.stderr


def test_no_compiler_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(ConfigError, match="C compiler"):
        launch_environment({}, {ENV_PREFIX + "A": "x"}, tmp_path / "cache")
    assert launch_environment({"A": "1"}, {}, tmp_path) == {"A": "1"}     # no secrets: nothing to build


def test_exposure_puts_no_key_in_the_arguments():
    closed = Exposure().tritonserver_args()
    assert all(f"segllm-admin-key={CLOSED_KEY}" in a for a in closed) and len(closed) == 2
    exp = Exposure(api_key="api-k3y", admin_key="adm-k3y")
    args = exp.tritonserver_args()
    assert not any("k3y" in a for a in args), args
    assert exp.secrets() == {ENV_PREFIX + "ADMIN": "adm-k3y", ENV_PREFIX + "API": "api-k3y"}
    assert all(placeholder(n) in " ".join(args) for n in exp.secrets())
    assert "k3y" not in repr(exp)


@pytest.mark.parametrize("key, problem", [("", "empty"), ("has space", "printable"), ("a\nb", "printable"),
                                          ("x" * 5000, "at most")])
def test_unsendable_keys_are_refused(key, problem):
    with pytest.raises(ConfigError, match=problem):
        check_key(key, "API key")


def test_key_files(tmp_path, capsys):
    f = tmp_path / "k"
    f.write_text("  s3cret-key\n")
    f.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by other users.*chmod 600"):
        read_key_file(f, "API key")
    f.chmod(0o600)
    assert read_key_file(f, "API key") == "s3cret-key"
    with pytest.raises(ConfigError, match="give the API key once"):
        choose_key("a", False, f, "API key", "--api-key", "SEGLLM_API_KEY")
    assert choose_key("from-env", False, None, "API key", "--api-key", "SEGLLM_API_KEY") == "from-env"
    assert "warning" not in capsys.readouterr().err
    assert choose_key("typed", True, None, "API key", "--api-key", "SEGLLM_API_KEY") == "typed"
    assert "visible to every local user" in capsys.readouterr().err
