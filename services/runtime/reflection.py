"""Server reflection that describes only the services a port serves, with their proto comments.

grpcio-reflection resolves every symbol in the process's default descriptor pool, so a port would describe
anything the process imported (the gateway would describe the deployer's internal services), and protoc's
Python output keeps no source info, so `grpcurl describe` would show no comments. Here each server gets a
pool holding only the files that define the services it lists (and their imports), built from the descriptor
set scripts/gen_protos.py writes with source info (gen/clawhub/descriptor_set.binpb), and answers with those
files as they were compiled, comments included.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as reflection_grpc

DESCRIPTOR_SET = "descriptor_set.binpb"


@functools.cache
def compiled_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Every proto file of the platform and its imports, with source info, by file name."""
    data = resources.files("clawhub").joinpath(DESCRIPTOR_SET).read_bytes()
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}


def _defining_file(service: str, files: dict[str, descriptor_pb2.FileDescriptorProto]
                   ) -> descriptor_pb2.FileDescriptorProto | None:
    for proto in files.values():
        if any((f"{proto.package}.{s.name}" if proto.package else s.name) == service for s in proto.service):
            return proto
    # Not one of ours (health, reflection): the generated module's descriptor, which has no comments.
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service).file
    except KeyError:
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


class _PortReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The reflection servicer of grpcio-reflection over `files` only: symbols resolve in a pool of these
    files, and files are answered as compiled (with their comments), each with its transitive imports."""

    def __init__(self, service_names: Iterable[str], files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()

        def add(name: str) -> None:
            if name in added:
                return
            added.add(name)
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])

        for name in files:
            add(name)
        super().__init__(service_names, pool=pool)
        self._files = files

    def _answer(self, request: reflection_pb2.ServerReflectionRequest, name: str,
                ) -> reflection_pb2.ServerReflectionResponse:
        names: list[str] = []

        def collect(file: str) -> None:
            if file not in names:
                names.append(file)
                for dependency in self._files[file].dependency:
                    collect(dependency)

        collect(name)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[self._files[n].SerializeToString() for n in names]),
            original_request=request)

    @staticmethod
    def _not_found(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        return reflection_pb2.ServerReflectionResponse(
            error_response=reflection_pb2.ErrorResponse(error_code=grpc.StatusCode.NOT_FOUND.value[0],
                                                        error_message="not found"),
            original_request=request)

    def _file_by_filename(self, request: Any, filename: str) -> reflection_pb2.ServerReflectionResponse:
        return self._answer(request, filename) if filename in self._files else self._not_found(request)

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str,
                                ) -> reflection_pb2.ServerReflectionResponse:
        try:
            name = self._pool.FindFileContainingSymbol(fully_qualified_name).name
        except KeyError:
            # The pool finds no methods by name (`describe pkg.Service.Method`): look for the service.
            service, _, method = fully_qualified_name.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
                found.FindMethodByName(method)
                name = found.file.name
            except KeyError:
                return self._not_found(request)
        return self._answer(request, name)

    def _file_containing_extension(self, request: Any, containing_type: str, extension_number: int,
                                   ) -> reflection_pb2.ServerReflectionResponse:
        try:
            message = self._pool.FindMessageTypeByName(containing_type)
            extension = self._pool.FindExtensionByNumber(message, extension_number)
            name = self._pool.FindFileContainingSymbol(extension.full_name).name
        except KeyError:
            return self._not_found(request)
        return self._answer(request, name)


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection on `server`, listing `service_names` (with the reflection service itself) and
    describing only them, the types they use and the error details, and nothing else."""
    names = (*service_names, reflection.SERVICE_NAME)
    ours = compiled_files()
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def include(proto: descriptor_pb2.FileDescriptorProto) -> None:
        if proto.name in files:
            return
        files[proto.name] = proto
        for dependency in proto.dependency:
            found = ours.get(dependency)
            if found is None:
                found = descriptor_pb2.FileDescriptorProto()
                descriptor_pool.Default().FindFileByName(dependency).CopyToProto(found)
            include(found)

    for service in names:
        if (proto := _defining_file(service, ours)) is not None:
            include(proto)
    # The error details every service sends (ErrorInfo, BadRequest, RetryInfo; services/runtime/errors.py),
    # so grpcurl shows them decoded.
    details = descriptor_pb2.FileDescriptorProto()
    error_details_pb2.DESCRIPTOR.CopyToProto(details)
    include(details)
    reflection_grpc.add_ServerReflectionServicer_to_server(_PortReflection(names, files), server)
