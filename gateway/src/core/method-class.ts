/**
 * Method classes for request-rate limits (SPEC G3): creating things is the most expensive and
 * the most tightly limited, reads the cheapest. The class follows from the method's verb, so
 * new methods are classified without a table to keep up to date.
 */
export const METHOD_CLASSES = ["create", "trigger", "read"] as const;
export type MethodClass = (typeof METHOD_CLASSES)[number];

const CREATE_VERBS = /^(Create|Put|Register)/;
const READ_VERBS = /^(Get|List|Watch|Subscribe|Describe|ServerReflectionInfo|Check)/;

/** create = Create*, Put*, Register*; read = Get*, List*, Watch*, Subscribe*; everything else (Cancel*, Revoke*, Suspend*, Update*, Delete*, …) is a trigger. */
export function methodClassOf(methodName: string): MethodClass {
  if (CREATE_VERBS.test(methodName)) return "create";
  if (READ_VERBS.test(methodName)) return "read";
  return "trigger";
}
