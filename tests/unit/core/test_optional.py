"""Optional packages: imported when present; one wording naming feature, package, install and alternative when not."""

from __future__ import annotations

import pytest

from codegraph3d.core.optional import OptionalDependencyError, missing_message, missing_packages, optional_import


def test_an_installed_module_is_returned():
    assert optional_import("json", "reports", "pip install json").dumps([]) == "[]"


def test_a_missing_module_names_the_feature_the_package_the_command_and_the_alternative():
    with pytest.raises(OptionalDependencyError) as raised:
        optional_import("no_such_package_here.sub", "skull stripping method 'x'", "pip install x==1", "choose 'none'")
    text = str(raised.value)
    assert text.startswith("skull stripping method 'x' needs no_such_package_here, which is not installed (")
    assert text.endswith("; install it with 'pip install x==1', or choose 'none'")
    assert isinstance(raised.value, ImportError)


def test_missing_packages_are_found_without_importing_them():
    assert missing_packages("json", "no_such_package_here") == ["no_such_package_here"]
    assert missing_message("f", ["a", "b"], "pip install a b") == "f needs a, b, which are not installed; install it with 'pip install a b'"
