/*
 * TensorRT 10 IPluginV3 wrapper of the fused token-select kernel (token_select.h).
 *
 *   name "TokenSelect", namespace "tpc", version "1"; one creator field: "k" (int32, >= 1).
 *   inputs:  0 scores (B, N) float32|float16; 1 tokens (B, N, D) float32|float16 (independent of the scores' dtype)
 *   outputs: 0 kept_indices (B, K) int32, ascending per row; 1 kept_tokens (B, K, D), the tokens' dtype
 *   linear (row-major) format only; N <= 8192; no workspace.
 *
 * In ONNX: a node with op_type "TokenSelect", attribute k (int) and plugin_namespace "tpc" (or domain "tpc"),
 * plugin_version "1" (TensorRT's ONNX parser defaults the version to "1"), imported by the parser's fallback
 * plugin importer once the library is loaded (trtexec --dynamicPlugins=libtpc_trt_plugin.so).
 */
#ifndef TPC_TOKEN_SELECT_PLUGIN_H
#define TPC_TOKEN_SELECT_PLUGIN_H

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <vector>

static_assert(NV_TENSORRT_MAJOR >= 10, "the TokenSelect plugin implements IPluginV3: TensorRT 10 or newer is needed");

namespace tpc
{
namespace trt
{

constexpr char const* kTokenSelectName = "TokenSelect";
constexpr char const* kTokenSelectVersion = "1";
constexpr char const* kTokenSelectNamespace = "tpc";
constexpr char const* kTokenSelectFieldK = "k";

class TokenSelectPlugin : public nvinfer1::IPluginV3,
                          public nvinfer1::IPluginV3OneCore,
                          public nvinfer1::IPluginV3OneBuild,
                          public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit TokenSelectPlugin(int32_t k);
    ~TokenSelectPlugin() override = default;
    // The serialized field points at mK: copies would point at the original. clone() builds a fresh object.
    TokenSelectPlugin(TokenSelectPlugin const&) = delete;
    TokenSelectPlugin& operator=(TokenSelectPlugin const&) = delete;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    int32_t mK;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class TokenSelectCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    TokenSelectCreator();
    ~TokenSelectCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace trt
} // namespace tpc

// Entry points of a dynamically loaded plugin library (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

#endif // TPC_TOKEN_SELECT_PLUGIN_H
