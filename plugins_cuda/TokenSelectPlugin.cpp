/*
 * TensorRT 10 IPluginV3 "TokenSelect" (namespace "tpc", version "1"): see TokenSelectPlugin.h for the interface.
 * Written against TensorRT 10's NvInferRuntime.h / NvInferPluginBase.h (IPluginV3OneCore/Build/Runtime,
 * IPluginCreatorV3One) and the shape of NVIDIA's sampleNonZeroPlugin; all work is done by tpc_token_select.
 *
 * Registration:
 *   - dynamic (default): the library exports getCreators() and setLoggerFinder() with C linkage, which is what
 *     IPluginRegistry::loadLibrary, trt.get_plugin_registry().load_library() and trtexec --dynamicPlugins use.
 *   - static (compile with TPC_TRT_STATIC_REGISTRATION, the CMake target tpc_trt_plugin_static): a static object
 *     registers the creator with getPluginRegistry() when the program starts, like REGISTER_TENSORRT_PLUGIN.
 *     Not both in one library: loadLibrary fails when a library's creators are already registered.
 */
#include "TokenSelectPlugin.h"

#include "token_select.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>

namespace tpc
{
namespace trt
{
namespace
{

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

void logError(std::string const& message) noexcept
{
    try
    {
        std::string const line = std::string("[tpc TokenSelect] ") + message;
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
        if (logger != nullptr)
        {
            logger->log(nvinfer1::ILogger::Severity::kERROR, line.c_str());
        }
        else
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
    }
}

bool isFloat(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

int dtypeCode(DataType type)
{
    return type == DataType::kHALF ? TPC_DTYPE_FLOAT16 : TPC_DTYPE_FLOAT32;
}

// The creator field "k": int32 as declared, but also the other integer widths a parser may hand over.
bool readK(nvinfer1::PluginField const& field, int64_t& k)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kINT32: k = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: k = *static_cast<int64_t const*>(field.data); return true;
    case PluginFieldType::kINT16: k = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT8: k = *static_cast<int8_t const*>(field.data); return true;
    default: return false;
    }
}

// Static shapes known at build time are checked here so that a bad engine fails to build, not to run.
int32_t checkShapes(nvinfer1::Dims const& scores, nvinfer1::Dims const& tokens, int32_t k)
{
    if (scores.nbDims != 2 || tokens.nbDims != 3)
    {
        logError("scores must be (B, N) and tokens (B, N, D)");
        return -1;
    }
    int64_t const n = scores.d[1];
    if (n >= 0 && tokens.d[1] >= 0 && n != tokens.d[1])
    {
        logError("scores and tokens disagree on N");
        return -1;
    }
    if (n >= 0 && (n > TPC_TOKEN_SELECT_MAX_TOKENS || k > n))
    {
        logError("need k <= N <= 8192, got k=" + std::to_string(k) + " N=" + std::to_string(n));
        return -1;
    }
    return 0;
}

} // namespace

TokenSelectPlugin::TokenSelectPlugin(int32_t k)
    : mK(k)
{
    mFieldsToSerialize.emplace_back(kTokenSelectFieldK, &mK, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
    mFieldCollection.fields = mFieldsToSerialize.data();
}

nvinfer1::IPluginCapability* TokenSelectPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* TokenSelectPlugin::clone() noexcept
{
    try
    {
        return new TokenSelectPlugin(mK);
    }
    catch (std::exception const& error)
    {
        logError(error.what());
    }
    return nullptr;
}

char const* TokenSelectPlugin::getPluginName() const noexcept
{
    return kTokenSelectName;
}

char const* TokenSelectPlugin::getPluginVersion() const noexcept
{
    return kTokenSelectVersion;
}

char const* TokenSelectPlugin::getPluginNamespace() const noexcept
{
    return kTokenSelectNamespace;
}

int32_t TokenSelectPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != 2 || nbOutputs != 2)
    {
        logError("expects 2 inputs (scores, tokens) and 2 outputs (kept_indices, kept_tokens)");
        return -1;
    }
    return checkShapes(in[0].desc.dims, in[1].desc.dims, mK);
}

int32_t TokenSelectPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != 2 || nbOutputs != 2)
    {
        return -1;
    }
    outputTypes[0] = DataType::kINT32;
    outputTypes[1] = inputTypes[1];
    return 0;
}

int32_t TokenSelectPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != 2 || nbOutputs != 2 || inputs[0].nbDims != 2 || inputs[1].nbDims != 3)
    {
        logError("scores must be (B, N) and tokens (B, N, D)");
        return -1;
    }
    nvinfer1::IDimensionExpr const* keep = exprBuilder.constant(mK);
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = keep;
    outputs[1].nbDims = 3;
    outputs[1].d[0] = inputs[1].d[0];
    outputs[1].d[1] = keep;
    outputs[1].d[2] = inputs[1].d[2];
    return 0;
}

bool TokenSelectPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != 2 || nbOutputs != 2 || pos < 0 || pos > 3)
    {
        return false;
    }
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isFloat(desc.type);                   // scores
    case 1: return isFloat(desc.type);                   // tokens
    case 2: return desc.type == DataType::kINT32;        // kept_indices
    default: return desc.type == inOut[1].desc.type;     // kept_tokens: the tokens' dtype
    }
}

int32_t TokenSelectPlugin::getNbOutputs() const noexcept
{
    return 2;
}

size_t TokenSelectPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t TokenSelectPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != 2 || nbOutputs != 2)
    {
        return -1;
    }
    return checkShapes(in[0].dims, in[1].dims, mK);
}

int32_t TokenSelectPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& scores = inputDesc[0].dims;
    nvinfer1::Dims const& tokens = inputDesc[1].dims;
    int64_t const batch = scores.d[0];
    int64_t const n = scores.d[1];
    int64_t const d = tokens.d[2];
    if (batch > INT32_MAX || n > INT32_MAX || d > INT32_MAX)
    {
        logError("tensor dimensions exceed int32");
        return -1;
    }
    int const status = tpc_token_select(inputs[0], dtypeCode(inputDesc[0].type), inputs[1],
        dtypeCode(inputDesc[1].type), static_cast<int>(batch), static_cast<int>(n), mK, static_cast<int>(d),
        static_cast<int32_t*>(outputs[0]), outputs[1], stream);
    if (status != TPC_SELECT_OK)
    {
        logError(tpc_token_select_error_string(status));
    }
    return status;
}

nvinfer1::IPluginV3* TokenSelectPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

nvinfer1::PluginFieldCollection const* TokenSelectPlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

TokenSelectCreator::TokenSelectCreator()
{
    mFieldNames.emplace_back(kTokenSelectFieldK, nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* TokenSelectCreator::getPluginName() const noexcept
{
    return kTokenSelectName;
}

char const* TokenSelectCreator::getPluginVersion() const noexcept
{
    return kTokenSelectVersion;
}

char const* TokenSelectCreator::getPluginNamespace() const noexcept
{
    return kTokenSelectNamespace;
}

nvinfer1::PluginFieldCollection const* TokenSelectCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* TokenSelectCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int64_t k = 0;
        bool found = false;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            nvinfer1::PluginField const& field = fc->fields[i];
            if (field.name != nullptr && std::strcmp(field.name, kTokenSelectFieldK) == 0)
            {
                found = readK(field, k);
            }
        }
        if (!found || k < 1 || k > TPC_TOKEN_SELECT_MAX_TOKENS)
        {
            logError("needs the integer field 'k' in [1, 8192]");
            return nullptr;
        }
        return new TokenSelectPlugin(static_cast<int32_t>(k));
    }
    catch (std::exception const& error)
    {
        logError(error.what());
    }
    return nullptr;
}

#ifdef TPC_TRT_STATIC_REGISTRATION
namespace
{
// What REGISTER_TENSORRT_PLUGIN(TokenSelectCreator) does, but with the namespace "tpc" instead of "": the macro's
// PluginRegistrar passes "" to registerCreator, and for a V3 creator the namespace it reports is the one to use.
struct TokenSelectStaticRegistration
{
    TokenSelectStaticRegistration()
    {
        static TokenSelectCreator creator;
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        if (registry == nullptr || !registry->registerCreator(creator, kTokenSelectNamespace))
        {
            logError("static registration with the TensorRT plugin registry failed");
        }
    }
};
TokenSelectStaticRegistration const gTokenSelectStaticRegistration{};
} // namespace
#endif

} // namespace trt
} // namespace tpc

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    tpc::trt::gLoggerFinder.store(finder);
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static tpc::trt::TokenSelectCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
