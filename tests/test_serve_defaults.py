"""`spd serve`'s command line: its defaults fill only what the user left unset, and its CPU
defaults follow the machine (bfloat16 only where the CPU has BF16 instructions; no reserved core
on a 2-CPU machine; the compiled engine with a compile cache that reloads). Fast: nothing is started."""
from __future__ import annotations

from server.__main__ import cpu_defaults, vllm_command

AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}
AVX2 = {"avx2", "fma"}


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_bfloat16_only_where_the_cpu_has_bf16_instructions_and_the_compiled_engine_reloads_its_cache():
    argv, env = cpu_defaults([], {}, AVX512_BF16, 2)
    assert _value(argv, "--dtype") == "bfloat16"
    assert "--enforce-eager" not in argv and env["VLLM_USE_AOT_COMPILE"] == "0"  # vLLM's compiled engine, cached
    argv, _ = cpu_defaults([], {}, AVX2, 2)
    assert _value(argv, "--dtype") == "float32"
    argv, _ = cpu_defaults([], {}, {"amx_bf16"}, 64)
    assert _value(argv, "--dtype") == "bfloat16"
    argv, env = cpu_defaults(["--enforce-eager"], {"VLLM_USE_AOT_COMPILE": "1"}, AVX2, 2)
    assert argv.count("--enforce-eager") == 1 and env["VLLM_USE_AOT_COMPILE"] == "1"


def test_the_users_dtype_and_thread_settings_win():
    argv, env = cpu_defaults(["--dtype=float32"], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, AVX512_BF16, 2)
    assert argv.count("--dtype=float32") == 1 and "--dtype" not in argv
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    _, env = cpu_defaults([], {"VLLM_CPU_OMP_THREADS_BIND": "0"}, AVX2, 2)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env  # an explicit binding is the user's whole choice
    _, env = cpu_defaults([], {"VLLM_CPU_KVCACHE_SPACE": "8"}, AVX2, 2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8"


def test_no_core_is_reserved_for_the_scheduler_on_two_cpus_but_vllms_reservation_stays_on_larger_machines():
    _, env = cpu_defaults([], {}, AVX2, 2)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    _, env = cpu_defaults([], {}, AVX2, 8)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env


def test_plugins_are_added_to_the_users_list_and_the_bundled_model_is_served_by_its_name():
    cmd, env = vllm_command(["--port", "1"], {"VLLM_PLUGINS": "other"})
    assert env["VLLM_PLUGINS"] == "other,spd_kv_projection,spd_api"
    assert cmd[1:4] == ["-m", "server.vllm_cli", "serve"]
    assert _value(cmd, "--served-model-name") == "smollm2-135m" and _value(cmd, "--host") == "127.0.0.1"
    cmd, _ = vllm_command(["--host", "0.0.0.0", "--max-model-len", "512"], {})
    assert _value(cmd, "--host") == "0.0.0.0" and cmd.count("--host") == 1 and cmd.count("--max-model-len") == 1


def test_the_model_is_vllm_serves_positional_argument_and_a_bundled_name_is_resolved_there_too():
    from spd_engine import models

    cmd, _ = vllm_command([], {})
    assert cmd[4] == str(models.resolve(models.DEFAULT_MODEL)) and "--model" not in cmd
    cmd, _ = vllm_command([models.DEFAULT_MODEL, "--port", "1"], {})
    assert cmd[4] == str(models.resolve(models.DEFAULT_MODEL)) and _value(cmd, "--served-model-name") == models.DEFAULT_MODEL
    cmd, _ = vllm_command(["/some/dir"], {})
    assert cmd[4] == "/some/dir" and cmd.count("/some/dir") == 1 and "--served-model-name" not in cmd
