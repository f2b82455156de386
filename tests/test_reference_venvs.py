"""The cached reference venvs (pyreft, adapters): reused while their recipe is unchanged,
rebuilt when INSTALL.sh or a lock file beside it changes (CI restores them from a cache)."""

from conftest import built_venv

# what an INSTALL.sh does, in miniature: start afresh, make bin/python, write the freeze file
# last; each build is counted in builds.txt beside the venv
FAKE_INSTALL = """set -e
rm -rf "$1" && mkdir -p "$1/bin" && touch "$1/bin/python"
echo built >> "$(dirname "$1")/builds.txt"
echo "pkg==1.0" > "$1/freeze.txt"
"""


def test_a_cached_venv_is_rebuilt_when_its_lock_file_changes(tmp_path):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    install_sh, lock = recipe / "INSTALL.sh", recipe / "requirements.lock.txt"
    install_sh.write_text(FAKE_INSTALL)
    lock.write_text("pkg==1.0\n")
    venv = tmp_path / "cache" / "venv"

    def builds() -> int:
        return len((venv.parent / "builds.txt").read_text().splitlines())

    assert built_venv(venv, install_sh, "freeze.txt") == venv / "bin" / "python"
    built_venv(venv, install_sh, "freeze.txt")
    assert builds() == 1  # reused
    lock.write_text("pkg==2.0\n")
    built_venv(venv, install_sh, "freeze.txt")
    assert builds() == 2  # the lock changed: built again
    built_venv(venv, install_sh, "freeze.txt")
    assert builds() == 2
    (venv / "freeze.txt").unlink()  # a build that did not finish
    built_venv(venv, install_sh, "freeze.txt")
    assert builds() == 3
