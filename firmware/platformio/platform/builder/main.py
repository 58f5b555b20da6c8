"""tinymlaas's local PlatformIO platform: compile and link a generated model project with the cross compiler the
project's options name (custom_* in platformio.ini, written by tinymlaas), and run the ELF in QEMU or Renode."""

from SCons.Script import AlwaysBuild, Default, DefaultEnvironment  # noqa: F401 - SCons provides these

env = DefaultEnvironment()
options = env.GetProjectOptions(as_dict=True)
prefix = options["custom_toolchain_prefix"]
cflags = options.get("custom_cflags", "").split()
env.Replace(
    CC=prefix + "gcc", CXX=prefix + "g++", AS=prefix + "gcc", AR=prefix + "ar", RANLIB=prefix + "ranlib",
    LINK=prefix + "gcc", OBJCOPY=prefix + "objcopy", SIZETOOL=prefix + "size", PROGNAME="firmware", PROGSUFFIX=".elf",
)
env.Append(CCFLAGS=cflags, ASFLAGS=cflags, LINKFLAGS=cflags + options.get("custom_ldflags", "").split())
env.Append(LIBS=["m"])

elf = env.BuildProgram()
Default(elf)

run = ("$PYTHONEXE -m tinymlaas run $SOURCE --target " + options["custom_target"]
       + " --inputs $PROJECT_DIR/inputs.bin --expected $PROJECT_DIR/expected_outputs.bin --emulator ")
for runner, title in (("qemu", "Run in QEMU"), ("renode", "Run in Renode")):
    if options.get("custom_runner") == runner:
        env.AddPlatformTarget(runner, elf, env.VerboseAction(run + runner, f"{title}: $SOURCE"), title)
