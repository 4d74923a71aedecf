"""What a torch.save file's pickle refers to, read without unpickling it."""
import pickletools
import zipfile


def pickle_globals(path) -> list:
    """The sorted 'module name' pairs of the globals a torch.save file's pickle names."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    names, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif opcode.name == "GLOBAL":
            names.add(arg.replace("\n", " ").strip())
        elif opcode.name == "STACK_GLOBAL":
            names.add(" ".join(strings[-2:]))
    return sorted(names)
