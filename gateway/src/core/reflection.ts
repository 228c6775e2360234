/**
 * gRPC server reflection (SPEC G1), so grpcurl-style tools can list the public services and
 * describe their methods and messages without a copy of the protos. Answers come from the
 * protobuf-es descriptors compiled into the gateway: every file that defines a served service,
 * with its transitive imports, serialized as FileDescriptorProto bytes.
 */
import { create, toBinary, type DescFile, type DescMessage, type DescService } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import {
  type ServerReflectionRequest,
  type ServerReflectionResponse,
  ServerReflectionResponseSchema,
} from "@outpost/proto/grpc/reflection/v1/reflection_pb.js";

/** gRPC status numbers used in ErrorResponse (the reflection protocol reports errors in-band). */
const GRPC_NOT_FOUND = 5;
const GRPC_UNIMPLEMENTED = 12;
const GRPC_INVALID_ARGUMENT = 3;

export class ReflectionIndex {
  private readonly serviceNames: string[];
  /** Fully-qualified symbol (message, enum, service, method, extension) -> the file declaring it. */
  private readonly symbols = new Map<string, DescFile>();
  /** File name as in imports, e.g. "outpost/dispatch/v1/dispatch.proto". */
  private readonly files = new Map<string, DescFile>();
  private readonly encoded = new Map<DescFile, Uint8Array>();

  constructor(services: readonly DescService[]) {
    this.serviceNames = [...new Set(services.map((s) => s.typeName))].sort();
    for (const service of services) this.addFile(service.file);
  }

  listServices(): string[] {
    return this.serviceNames;
  }

  /** The file declaring a symbol and everything it imports, or undefined when unknown. */
  fileContainingSymbol(symbol: string): Uint8Array[] | undefined {
    const file = this.symbols.get(symbol.replace(/^\./, ""));
    return file && this.withDependencies(file);
  }

  fileByFilename(name: string): Uint8Array[] | undefined {
    const file = this.files.get(name);
    return file && this.withDependencies(file);
  }

  answer(req: ServerReflectionRequest): ServerReflectionResponse {
    const base = { validHost: req.host, originalRequest: req };
    const files = (list: Uint8Array[]) =>
      create(ServerReflectionResponseSchema, {
        ...base,
        messageResponse: { case: "fileDescriptorResponse", value: { fileDescriptorProto: list } },
      });
    const error = (code: number, message: string) =>
      create(ServerReflectionResponseSchema, {
        ...base,
        messageResponse: { case: "errorResponse", value: { errorCode: code, errorMessage: message } },
      });
    const request = req.messageRequest;
    switch (request.case) {
      case "listServices":
        return create(ServerReflectionResponseSchema, {
          ...base,
          messageResponse: { case: "listServicesResponse", value: { service: this.serviceNames.map((name) => ({ name })) } },
        });
      case "fileContainingSymbol": {
        const found = this.fileContainingSymbol(request.value);
        return found ? files(found) : error(GRPC_NOT_FOUND, `symbol not found: ${request.value}`);
      }
      case "fileByFilename": {
        const found = this.fileByFilename(request.value);
        return found ? files(found) : error(GRPC_NOT_FOUND, `file not found: ${request.value}`);
      }
      case "fileContainingExtension":
      case "allExtensionNumbersOfType":
        // The public contracts declare no extensions.
        return error(GRPC_UNIMPLEMENTED, "the served contracts declare no extensions");
      default:
        return error(GRPC_INVALID_ARGUMENT, "message_request is required");
    }
  }

  private addFile(file: DescFile): void {
    const name = file.proto.name;
    if (this.files.has(name)) return;
    this.files.set(name, file);
    for (const message of file.messages) this.addMessage(file, message);
    for (const e of file.enums) this.symbols.set(e.typeName, file);
    for (const ext of file.extensions) this.symbols.set(ext.typeName, file);
    for (const service of file.services) {
      this.symbols.set(service.typeName, file);
      for (const method of service.methods) this.symbols.set(`${service.typeName}.${method.name}`, file);
    }
    for (const dependency of file.dependencies) this.addFile(dependency);
  }

  private addMessage(file: DescFile, message: DescMessage): void {
    this.symbols.set(message.typeName, file);
    for (const nested of message.nestedMessages) this.addMessage(file, nested);
    for (const e of message.nestedEnums) this.symbols.set(e.typeName, file);
    for (const ext of message.nestedExtensions) this.symbols.set(ext.typeName, file);
  }

  /** The file first, then its transitive imports, each once. */
  private withDependencies(file: DescFile): Uint8Array[] {
    const seen = new Set<DescFile>();
    const out: Uint8Array[] = [];
    const visit = (f: DescFile) => {
      if (seen.has(f)) return;
      seen.add(f);
      out.push(this.encode(f));
      for (const d of f.dependencies) visit(d);
    };
    visit(file);
    return out;
  }

  private encode(file: DescFile): Uint8Array {
    let bytes = this.encoded.get(file);
    if (!bytes) {
      bytes = toBinary(FileDescriptorProtoSchema, file.proto);
      this.encoded.set(file, bytes);
    }
    return bytes;
  }
}
